//! The app under test: settings pointed at a test's servers, `TestApp` (every role, in this
//! process or another), `CheckoutProcess` (a real `checkout run`) and the harness that starts
//! them together.

use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use checkout::app::{App, Role};
use checkout::config::{Secret, Settings};

use super::servers::{port, NatsServer, SandboxPsp, TestDb};

static TELEMETRY: Once = Once::new();

fn init_telemetry() {
    TELEMETRY.call_once(|| {
        if std::env::var("TEST_LOG").is_ok() {
            checkout::telemetry::init(false);
        }
    });
}

/// The secret the sandbox signs its webhooks with in tests.
pub const TEST_WEBHOOK_SECRET: &str = "whsec_test_secret";

/// The key sealing payment tokens in tests (payments.token_keys).
pub const TEST_TOKEN_KEY: &str = "7465737420746f6b656e206b6579206f66203332206279746573212121212121";

/// Settings for a test: free ports, its NATS, its database, short timers.
pub fn test_settings(nats: &NatsServer, db: &TestDb) -> Settings {
    test_settings_on(nats.url(), db)
}

/// The same for NATS at `url` (one server, or a cluster's comma-separated list).
pub fn test_settings_on(url: String, db: &TestDb) -> Settings {
    test_settings_at(url, db.url.clone())
}

/// The same for any database URL (a PostgreSQL HA group's list of servers, say).
pub fn test_settings_at(url: String, database: String) -> Settings {
    let mut s = Settings::load().expect("default settings load");
    s.nats.url = url;
    s.database.url = Secret::new(database);
    s.database.max_connections = 10;
    s.http.addr = "127.0.0.1:0".into();
    s.auth.jwt_secret = Secret::new("test-secret-of-at-least-32-bytes!!");
    s.payments.token_keys = Secret::new(TEST_TOKEN_KEY);
    s.psp.webhook_secrets = Secret::new(TEST_WEBHOOK_SECRET);
    s.nats.ack_wait = Duration::from_secs(3);
    s.nats.publish_timeout = Duration::from_secs(2);
    // JetStream reserves max_bytes on disk per stream and server: keep test servers small.
    s.nats.stream_max_bytes = 256 << 20;
    s.nats.deadletter_max_bytes = 64 << 20;
    s.consumer.nak_base_delay = Duration::from_millis(50);
    s.consumer.nak_max_delay = Duration::from_millis(500);
    s.edge.outbox_interval = Duration::from_millis(200);
    s.edge.outbox_grace = Duration::from_millis(500);
    // Tests that are not about admission control or rate limits send bursts that should all
    // be admitted (one admin user sets up every product).
    s.edge.admission_wait = Duration::from_secs(10);
    s.edge.requests_per_user_per_s = 100_000;
    s.edge.requests_per_user_burst = 100_000;
    s.edge.checkouts_per_user_per_min = 100_000;
    s.edge.checkouts_per_user_burst = 100_000;
    s.metrics.addr = "127.0.0.1:0".into();
    s.metrics.jetstream_interval = Duration::from_millis(200);
    // Merchant webhooks go to receivers on this machine, and retry within a test's patience.
    s.webhooks.allow_private_targets = true;
    s.webhooks.backoff_base = Duration::from_millis(100);
    s.webhooks.backoff_max = Duration::from_secs(1);
    s.webhooks.poll_interval = Duration::from_millis(50);
    s.webhooks.timeout = Duration::from_secs(5);
    s
}

/// Every role running against a test's own NATS and database.
pub struct TestApp {
    /// Held for its Drop: the roles stop when the test ends.
    #[allow(dead_code)]
    pub app: Option<App>,
    pub base: String,
    pub psp: String,
    /// Held for its Drop: the sandbox PSP stops when the test ends.
    #[allow(dead_code)]
    pub psp_server: SandboxPsp,
    pub http: reqwest::Client,
    pub settings: Settings,
    pub pool: sqlx::PgPool,
    // Field order matters: the app stops before its servers go away.
    pub nats: NatsServer,
    /// Held for its Drop: the database is dropped when the test ends.
    #[allow(dead_code)]
    pub db: TestDb,
}

impl TestApp {
    /// Starts everything with the test defaults.
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Starts everything after `tweak` adjusts the settings.
    pub async fn spawn_with(tweak: impl FnOnce(&mut Settings)) -> Self {
        Self::spawn_roles(&Role::ALL, tweak).await
    }

    /// Starts some roles (the edge and the PSP among them).
    pub async fn spawn_roles(roles: &[Role], tweak: impl FnOnce(&mut Settings)) -> Self {
        Self::spawn_on(TestDb::new(), roles, tweak).await
    }

    /// Starts some roles against a database of the caller's choosing.
    pub async fn spawn_on(db: TestDb, roles: &[Role], tweak: impl FnOnce(&mut Settings)) -> Self {
        init_telemetry();
        let nats = NatsServer::start();
        let mut settings = test_settings(&nats, &db);
        tweak(&mut settings);
        let psp_server = SandboxPsp::start().await;
        settings.psp.url = psp_server.url().to_owned();
        let app = App::build(settings.clone(), roles)
            .await
            .expect("app starts");
        let base = format!("http://{}", app.http_addr().expect("edge runs"));
        let pool = sqlx::PgPool::connect(&db.url).await.expect("test pool");
        Self {
            app: Some(app),
            base,
            psp: settings.psp.url.clone(),
            psp_server,
            http: reqwest::Client::new(),
            settings,
            pool,
            nats,
            db,
        }
    }

    /// Wraps an app the test built itself (for a custom set of roles), talking to `psp`.
    pub async fn attach(
        app: App,
        settings: Settings,
        psp_server: SandboxPsp,
        nats: NatsServer,
        db: TestDb,
    ) -> Self {
        init_telemetry();
        let base = format!("http://{}", app.http_addr().expect("edge runs"));
        let pool = sqlx::PgPool::connect(&db.url).await.expect("test pool");
        Self {
            app: Some(app),
            base,
            psp: psp_server.url().to_owned(),
            psp_server,
            http: reqwest::Client::new(),
            settings,
            pool,
            nats,
            db,
        }
    }

    /// Wraps roles that run in another process (the edge at `base`), with the PSP in this one.
    pub async fn remote(
        base: String,
        settings: Settings,
        psp_server: SandboxPsp,
        nats: NatsServer,
        db: TestDb,
    ) -> Self {
        init_telemetry();
        let pool = sqlx::PgPool::connect(&db.url).await.expect("test pool");
        Self {
            app: None,
            base,
            psp: psp_server.url().to_owned(),
            psp_server,
            http: reqwest::Client::new(),
            settings,
            pool,
            nats,
            db,
        }
    }

    /// Starts more role processes against the same NATS, database and PSP (kept until dropped).
    pub async fn start_roles(&self, roles: &[Role]) -> App {
        App::build(self.settings.clone(), roles)
            .await
            .expect("extra roles start")
    }
}

/// Runs the audit against a database and a PSP, failing the test on any finding.
pub async fn audit(pool: &sqlx::PgPool, psp: &str, settings: &Settings) {
    let mut settings = settings.clone();
    settings.psp.url = psp.to_owned();
    let providers = checkout::payments::provider(&settings).expect("psp clients");
    let report = checkout::audit::run(pool, providers.as_ref(), settings.watchdog.pending_limit)
        .await
        .expect("the audit runs");
    assert!(report.ok(), "audit findings:\n{report}");
}

/// Polls `check` until it holds, with a deadline.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `checkout run <roles>` process, for tests that kill or stop it for real.
pub struct CheckoutProcess {
    child: Option<Child>,
    roles: String,
    env: Vec<(String, String)>,
}

impl CheckoutProcess {
    /// Starts `checkout run <roles>` with the settings as environment variables.
    pub fn start(roles: &str, env: Vec<(String, String)>) -> Self {
        let mut p = Self {
            child: None,
            roles: roles.to_owned(),
            env,
        };
        p.restart();
        p
    }

    /// Starts it again with the same roles and environment.
    pub fn restart(&mut self) {
        let log = std::env::var("TEST_LOG").is_ok();
        let child = Command::new(env!("CARGO_BIN_EXE_checkout"))
            .args(["run", &self.roles])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", if log { "info" } else { "error" })
            .stdout(if log { Stdio::inherit() } else { Stdio::null() })
            .stderr(if log { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .expect("checkout process");
        self.child = Some(child);
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then how long it took to exit and its exit status (or None if it had not
    /// exited within `within`; it is killed then).
    /// Waits without blocking the test's runtime (its PSP may be serving the process).
    pub async fn terminate(
        &mut self,
        within: Duration,
    ) -> Option<(Duration, std::process::ExitStatus)> {
        let mut child = self.child.take()?;
        let started = Instant::now();
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .await;
        while started.elapsed() < within {
            if let Ok(Some(status)) = child.try_wait() {
                return Some((started.elapsed(), status));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for CheckoutProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The environment that points a `checkout` process at a test's servers.
pub fn process_env(settings: &Settings, http_port: u16, psp: &str) -> Vec<(String, String)> {
    let s = settings;
    [
        ("CHECKOUT__NATS__URL", s.nats.url.clone()),
        (
            "CHECKOUT__PAYMENTS__TOKEN_KEYS",
            s.payments.token_keys.expose().to_owned(),
        ),
        (
            "CHECKOUT__NATS__STREAM_MAX_BYTES",
            s.nats.stream_max_bytes.to_string(),
        ),
        (
            "CHECKOUT__NATS__DEADLETTER_MAX_BYTES",
            s.nats.deadletter_max_bytes.to_string(),
        ),
        (
            "CHECKOUT__DATABASE__URL",
            s.database.url.expose().to_owned(),
        ),
        ("CHECKOUT__HTTP__ADDR", format!("127.0.0.1:{http_port}")),
        ("CHECKOUT__PSP__URL", psp.to_owned()),
        (
            "CHECKOUT__WEBHOOKS__ALLOW_PRIVATE_TARGETS",
            s.webhooks.allow_private_targets.to_string(),
        ),
        (
            "CHECKOUT__WEBHOOKS__BACKOFF_BASE",
            humantime::format_duration(s.webhooks.backoff_base).to_string(),
        ),
        (
            "CHECKOUT__WEBHOOKS__BACKOFF_MAX",
            humantime::format_duration(s.webhooks.backoff_max).to_string(),
        ),
        (
            "CHECKOUT__WEBHOOKS__POLL_INTERVAL",
            humantime::format_duration(s.webhooks.poll_interval).to_string(),
        ),
        (
            "CHECKOUT__PSP__WEBHOOK_SECRETS",
            s.psp.webhook_secrets.expose().to_owned(),
        ),
        // Tests poll their orders far faster than a person would.
        (
            "CHECKOUT__EDGE__REQUESTS_PER_USER_PER_S",
            s.edge.requests_per_user_per_s.to_string(),
        ),
        (
            "CHECKOUT__EDGE__REQUESTS_PER_USER_BURST",
            s.edge.requests_per_user_burst.to_string(),
        ),
        (
            "CHECKOUT__AUTH__JWT_SECRET",
            s.auth.jwt_secret.expose().to_owned(),
        ),
        (
            "CHECKOUT__NATS__ACK_WAIT",
            humantime::format_duration(s.nats.ack_wait).to_string(),
        ),
        (
            "CHECKOUT__CONSUMER__NAK_BASE_DELAY",
            humantime::format_duration(s.consumer.nak_base_delay).to_string(),
        ),
        (
            "CHECKOUT__CONSUMER__NAK_MAX_DELAY",
            humantime::format_duration(s.consumer.nak_max_delay).to_string(),
        ),
        (
            "CHECKOUT__EDGE__OUTBOX_INTERVAL",
            humantime::format_duration(s.edge.outbox_interval).to_string(),
        ),
        (
            "CHECKOUT__EDGE__OUTBOX_GRACE",
            humantime::format_duration(s.edge.outbox_grace).to_string(),
        ),
        (
            "CHECKOUT__PAYMENTS__RATE_LIMIT_PER_S",
            s.payments.rate_limit_per_s.to_string(),
        ),
        ("CHECKOUT__METRICS__ADDR", "127.0.0.1:0".to_owned()),
        ("CHECKOUT__METRICS__JETSTREAM_INTERVAL", "200ms".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A PSP in the test process, and every other role in a real `checkout` process.
pub async fn harness() -> (TestApp, CheckoutProcess) {
    harness_with(&[]).await
}

/// The same, with extra environment for the process (e.g. fault injection).
pub async fn harness_with(extra: &[(&str, &str)]) -> (TestApp, CheckoutProcess) {
    let nats = NatsServer::start();
    let db = TestDb::new();
    let mut settings = test_settings(&nats, &db);
    settings.payments.rate_limit_per_s = 100_000.0;
    let psp = SandboxPsp::start().await;
    let psp_url = psp.url().to_owned();
    settings.psp.url = psp_url.clone();
    let http_port = port();
    let mut env = process_env(&settings, http_port, &psp_url);
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let process = CheckoutProcess::start("edge,reserve,authorize,order,compensate", env);
    let base = format!("http://127.0.0.1:{http_port}");
    // Ready means migrated: the process creates the database.
    wait_ready(&reqwest::Client::new(), &base).await;
    let app = TestApp::remote(base, settings, psp, nats, db).await;
    (app, process)
}

pub async fn wait_ready(http: &reqwest::Client, base: &str) {
    eventually(
        "the process to be ready",
        Duration::from_secs(30),
        || async {
            http.get(format!("{base}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        },
    )
    .await;
}
