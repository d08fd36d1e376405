//! High availability on a 3-node JetStream cluster (R3 streams): under steady checkout load,
//! kill the CHECKOUT stream's leader, one of the two processes that run every role, or the
//! PostgreSQL primary of an HA group (pg_auto_failover, a synchronous standby), or switch the
//! primary over, and check that buyers were answered, every accepted order ended, and nothing
//! was lost or done twice.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{
    audit, checkout_body, eventually, nats_bin, port, process_env, spawn_nats, test_settings_at,
    wait_ready, CheckoutProcess, PgCluster, SandboxPsp, TestDb,
};

/// One nats-server of a test's cluster: a real process, killed and restarted for real.
struct Node {
    name: String,
    client: u16,
    monitor: u16,
    config: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self) {
        let mut command = Command::new(nats_bin());
        command.arg("-c").arg(&self.config);
        self.child = Some(spawn_nats(&mut command));
    }

    /// SIGKILL: the machine is gone, nothing flushed.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Three nats-servers forming one JetStream cluster on free ports, each with its own store.
pub struct Cluster {
    nodes: Vec<Node>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Self {
        Self::start_with("")
    }

    /// The same, with more configuration for every node (e.g. subject mappings).
    pub fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let routes: Vec<u16> = (0..3).map(|_| port()).collect();
        let seeds = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let (client, monitor) = (port(), port());
            let store = dir.path().join(&name);
            let config = dir.path().join(format!("{name}.conf"));
            let text = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n\
                 jetstream {{ store_dir: \"{}\" }}\n\
                 cluster {{ name: test, listen: 127.0.0.1:{route}, routes: [{seeds}] }}\n{extra}\n",
                store.display()
            );
            std::fs::write(&config, text).expect("node config written");
            nodes.push(Node {
                name,
                client,
                monitor,
                config,
                child: None,
            });
        }
        // Together: a node alone waits for its peers before it is ready.
        let mut cluster = Self {
            nodes,
            http: reqwest::Client::new(),
            _dir: dir,
        };
        std::thread::scope(|s| {
            for node in &mut cluster.nodes {
                s.spawn(move || node.start());
            }
        });
        cluster
    }

    /// Every node's client URL: processes get the whole list.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A node's `/jsz` with per-stream detail, or None if it does not answer.
    async fn jsz(&self, node: usize) -> Option<Value> {
        let url = format!(
            "http://127.0.0.1:{}/jsz?accounts=true&streams=true",
            self.nodes[node].monitor
        );
        let resp = self
            .http
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        resp.json().await.ok()
    }

    /// A stream's detail as one node sees it.
    async fn stream(&self, node: usize, name: &str) -> Option<Value> {
        let jsz = self.jsz(node).await?;
        jsz["account_details"]
            .as_array()?
            .iter()
            .filter_map(|a| a["stream_detail"].as_array())
            .flatten()
            .find(|s| s["name"] == name)
            .cloned()
    }

    /// Waits until every node knows a meta leader: streams can be created.
    pub async fn wait_formed(&self) {
        eventually(
            "the cluster to elect a meta leader",
            Duration::from_secs(30),
            || async {
                let mut all = true;
                for i in 0..self.nodes.len() {
                    let leader = self
                        .jsz(i)
                        .await
                        .map(|j| j["meta_cluster"]["leader"].clone());
                    all &= leader.is_some_and(|l| l.as_str().is_some_and(|s| !s.is_empty()));
                }
                all
            },
        )
        .await;
    }

    /// The index of the node leading `stream`, as any live node reports it.
    async fn leader_of(&self, stream: &str) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_none() {
                continue;
            }
            if let Some(detail) = self.stream(i, stream).await {
                if let Some(leader) = detail["cluster"]["leader"].as_str() {
                    return self.nodes.iter().position(|n| n.name == leader);
                }
            }
        }
        None
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

/// Two `checkout` processes running every role but the PSP, on a cluster, one PostgreSQL
/// database, and the sandbox PSP in this test process.
struct Shop {
    cluster: Cluster,
    processes: Vec<CheckoutProcess>,
    edges: Vec<String>,
    psp: String,
    secret: String,
    settings: checkout::config::Settings,
    pool: sqlx::PgPool,
    http: reqwest::Client,
    _psp: SandboxPsp,
    db: Database,
}

/// Where the shop keeps its data.
enum Database {
    /// A fresh database on the machine's PostgreSQL (held to be dropped after the test).
    Single(#[allow(dead_code)] TestDb),
    /// A pg_auto_failover group of the test's own: a primary and a synchronous standby.
    Ha(PgCluster),
}

const ROLES: &str = "edge,reserve,authorize,order,compensate";
const SKU: &str = "TEE";
const STOCK: i64 = 100_000;

impl Shop {
    async fn start(ha: bool) -> Self {
        let cluster = Cluster::start();
        cluster.wait_formed().await;
        let (url, db) = if ha {
            let pg = PgCluster::start().await;
            (pg.url("checkout"), Database::Ha(pg))
        } else {
            let db = TestDb::new();
            (db.url.clone(), Database::Single(db))
        };
        let mut settings = test_settings_at(cluster.url(), url);
        settings.nats.replicas = 3;
        settings.payments.rate_limit_per_s = 100_000.0;
        let psp_app = SandboxPsp::start().await;
        let psp = psp_app.url().to_owned();
        settings.psp.url = psp.clone();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(1500))
            .build()
            .expect("http client");
        let mut processes = Vec::new();
        let mut edges = Vec::new();
        for _ in 0..2 {
            let http_port = port();
            let mut env = process_env(&settings, http_port, &psp);
            env.extend(
                [
                    ("CHECKOUT__NATS__REPLICAS", "3"),
                    ("CHECKOUT__NATS__PUBLISH_TIMEOUT", "2s"),
                ]
                .map(|(k, v)| (k.to_owned(), v.to_owned())),
            );
            processes.push(CheckoutProcess::start(ROLES, env));
            let base = format!("http://127.0.0.1:{http_port}");
            // One after the other: the first one creates the database and migrates it.
            wait_ready(&http, &base).await;
            edges.push(base);
        }
        // The service's own pool: on an HA group it follows the primary.
        let pool = checkout::db::connect(&settings.database)
            .await
            .expect("test pool");
        let secret = settings.auth.jwt_secret.expose().to_owned();
        let shop = Self {
            cluster,
            processes,
            edges,
            psp,
            secret,
            settings,
            pool,
            http,
            _psp: psp_app,
            db,
        };
        shop.stock_up().await;
        shop
    }

    fn token(&self, user: &str, admin: bool) -> String {
        checkout::auth::mint(&self.secret, user, admin, Duration::from_secs(3600)).expect("token")
    }

    async fn stock_up(&self) {
        let admin = self.token("admin", true);
        for (path, body) in [
            (
                format!("/api/admin/products/{SKU}"),
                json!({"name": "Tee", "price": "12.50", "currency": "USD", "weightGrams": 200}),
            ),
            (format!("/api/admin/stock/{SKU}"), json!({"onHand": STOCK})),
        ] {
            let resp = self
                .http
                .put(format!("{}{path}", self.edges[0]))
                .bearer_auth(&admin)
                .json(&body)
                .send()
                .await
                .expect("admin request");
            assert_eq!(resp.status(), StatusCode::OK);
        }
    }
}

/// What one buyer got: an order id once a checkout was accepted, or what the last try saw,
/// and how long the buyer waited from the first request to the accepted checkout, retries
/// included.
struct Outcome {
    user: String,
    order: Result<String, String>,
    waited: Duration,
    /// The cart the buyer was given, if adding to it was answered.
    cart: Option<String>,
}

/// How long a client keeps trying one request.
#[derive(Clone, Copy)]
struct Patience {
    tries: u32,
    within: Duration,
}

/// One request as a real client makes it: on a refused connection, a timeout or a 5xx, try
/// again (the other edge first), backing off up to 2 s, while it has tries and time left, with
/// the same body and Idempotency-Key. Returns the last status and body, or what the last try
/// ran into.
async fn with_retries(
    http: &reqwest::Client,
    edges: &[String],
    first_edge: usize,
    patience: Patience,
    send: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
) -> Result<(StatusCode, Value), String> {
    let started = Instant::now();
    let mut last = String::new();
    for attempt in 0..patience.tries as usize {
        if attempt > 0 {
            if started.elapsed() >= patience.within {
                break;
            }
            let backoff = Duration::from_millis(250 << (attempt - 1).min(3));
            tokio::time::sleep(backoff).await;
        }
        let base = &edges[(first_edge + attempt) % edges.len()];
        match send(http, base).send().await {
            Ok(resp) if !resp.status().is_server_error() => {
                let status = resp.status();
                let body = resp.json().await.unwrap_or(Value::Null);
                return Ok((status, body));
            }
            Ok(resp) => {
                let status = resp.status();
                last = refusal(status, &resp.json().await.unwrap_or(Value::Null));
            }
            Err(e) if e.is_timeout() => last = "timeout".to_owned(),
            Err(e) if e.is_connect() => last = "connection refused".to_owned(),
            Err(e) => last = format!("transport error ({e})"),
        }
    }
    Err(last)
}

/// What an error answer says (status and error code), for the tally of refused buyers.
fn refusal(status: StatusCode, body: &Value) -> String {
    format!("{status} {}", body["error"]["code"])
}

/// A buyer: one unit into a cart on one edge, checkout on the other.
async fn buy(shop: Arc<ShopClient>, n: usize) -> Outcome {
    let asked = Instant::now();
    let user = format!("buyer-{n}");
    let token =
        checkout::auth::mint(&shop.secret, &user, false, Duration::from_secs(3600)).expect("token");
    let cart = with_retries(&shop.http, &shop.edges, n, shop.patience, |http, base| {
        http.post(format!("{base}/api/cart/items"))
            .bearer_auth(&token)
            .json(&json!({"sku": SKU, "qty": 1}))
    })
    .await;
    let body = match cart {
        Ok((StatusCode::OK, body)) => body,
        Ok((status, body)) => {
            let order = Err(format!("cart: {}", refusal(status, &body)));
            return Outcome::gave_up(user, order);
        }
        Err(last) => {
            let order = Err(format!("cart: {last}"));
            return Outcome::gave_up(user, order);
        }
    };
    let cart_id = body["cartId"].as_str().unwrap_or_default().to_owned();
    let placed = with_retries(
        &shop.http,
        &shop.edges,
        n + 1,
        shop.patience,
        |http, base| {
            http.post(format!("{base}/api/checkout"))
                .bearer_auth(&token)
                .header("Idempotency-Key", "k")
                .json(&checkout_body(&cart_id, "tok_visa"))
        },
    )
    .await;
    let order = match placed {
        Ok((status, body)) if status.is_success() => body["orderId"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("checkout: {status} without an order id")),
        Ok((status, body)) => Err(format!("checkout: {}", refusal(status, &body))),
        Err(last) => Err(format!("checkout: {last}")),
    };
    Outcome {
        user,
        order,
        waited: asked.elapsed(),
        cart: Some(cart_id),
    }
}

impl Outcome {
    fn gave_up(user: String, order: Result<String, String>) -> Self {
        Self {
            user,
            order,
            waited: Duration::ZERO,
            cart: None,
        }
    }
}

/// What the load needs of the shop (shared with the buyers' tasks).
struct ShopClient {
    http: reqwest::Client,
    edges: Vec<String>,
    secret: String,
    patience: Patience,
}

/// What to break, a few seconds into the load.
#[derive(Clone, Copy)]
enum Fault {
    /// SIGKILL the nats-server leading the CHECKOUT stream; restart it later.
    StreamLeader,
    /// SIGKILL one of the two processes (an edge and one process of every consumer role).
    Process,
    /// SIGKILL the PostgreSQL primary (its pg_autoctl and postgres); start it again later.
    DatabasePrimary,
    /// A planned switchover of the PostgreSQL primary, with the engine's own command.
    DatabaseSwitchover,
}

impl Fault {
    fn database(&self) -> bool {
        matches!(self, Fault::DatabasePrimary | Fault::DatabaseSwitchover)
    }

    /// How long the load runs, and how long the fault lasts before what broke comes back.
    fn timing(&self) -> (Duration, Duration) {
        match self {
            // Killed at 5 s, back at 30 s.
            Fault::DatabasePrimary => (Duration::from_secs(35), Duration::from_secs(25)),
            _ => (Duration::from_secs(24), Duration::from_secs(10)),
        }
    }
}

const RATE_PER_S: u64 = 15;
const BREAK_AT: Duration = Duration::from_secs(5);

/// One failover test at a time: each runs three nats-servers, two checkout processes and maybe
/// three PostgreSQL servers, and two at once on a 2-core machine measure each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn failover(fault: Fault) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut shop = Shop::start(fault.database()).await;
    let (load_for, down_for) = fault.timing();
    let patience = if fault.database() {
        // Clients that retry one Idempotency-Key for up to 15 s (issue #31).
        Patience {
            tries: 100,
            within: Duration::from_secs(15),
        }
    } else {
        Patience {
            tries: 4,
            within: Duration::from_secs(5),
        }
    };
    let client = Arc::new(ShopClient {
        http: shop.http.clone(),
        edges: shop.edges.clone(),
        secret: shop.secret.clone(),
        patience,
    });
    let heartbeat = match &shop.db {
        Database::Ha(pg) => Some(Heartbeat::start(pg).await),
        Database::Single(_) => None,
    };
    let started = Instant::now();
    let load = tokio::spawn({
        let client = client.clone();
        async move {
            let mut buyers = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE_PER_S));
            let mut n = 0;
            while started.elapsed() < load_for {
                tick.tick().await;
                buyers.spawn(buy(client.clone(), n));
                n += 1;
            }
            buyers.join_all().await
        }
    });

    tokio::time::sleep_until((started + BREAK_AT).into()).await;
    let (killed, elected) = break_it(fault, &mut shop, down_for).await;
    tokio::time::sleep_until((started + BREAK_AT + down_for).into()).await;
    mend(fault, &mut shop, killed);
    let outcomes = load.await.expect("load ran");

    // Availability: buyers whose checkout was accepted (retries included).
    let tried = outcomes.len();
    let accepted: Vec<(&str, &str)> = outcomes
        .iter()
        .filter_map(|o| o.order.as_deref().ok().map(|id| (o.user.as_str(), id)))
        .collect();
    let share = accepted.len() as f64 / tried as f64;
    let mut refused: HashMap<&str, usize> = HashMap::new();
    for why in outcomes.iter().filter_map(|o| o.order.as_ref().err()) {
        *refused.entry(why.as_str()).or_default() += 1;
    }

    // Every accepted order ends (within 60 s of the load's end).
    let ids: Vec<uuid::Uuid> = accepted
        .iter()
        .map(|(_, id)| id.parse().expect("order id"))
        .collect();
    eventually(
        "every accepted order to end",
        Duration::from_secs(60),
        || async {
            let (ended,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM orders.orders WHERE order_id = ANY($1)")
                    .bind(&ids)
                    .fetch_one(&shop.pool)
                    .await
                    .expect("count");
            ended as usize == ids.len()
        },
    )
    .await;
    let (confirmed,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM orders.orders WHERE order_id = ANY($1) AND status = 'confirmed'",
    )
    .bind(&ids)
    .fetch_one(&shop.pool)
    .await
    .expect("count");
    // The stall: the longest wait from acceptance to a terminal status.
    let (stall_ms,): (f64,) = sqlx::query_as(
        "SELECT coalesce(max(extract(epoch FROM o.created_at - c.created_at) * 1000), 0)::float8 \
         FROM orders.orders o JOIN edge.checkouts c USING (order_id)",
    )
    .fetch_one(&shop.pool)
    .await
    .expect("stall");

    let worst_answer = outcomes.iter().map(|o| o.waited).max().unwrap_or_default();
    eprintln!(
        "failover: {}/{} checkouts accepted ({:.2} %), {confirmed} confirmed, \
         longest acceptance-to-end {:.1} s, longest buyer wait {:.1} s; not accepted: \
         {refused:?}",
        accepted.len(),
        tried,
        share * 100.0,
        stall_ms / 1000.0,
        worst_answer.as_secs_f64(),
    );
    // A planned switchover refuses no buyer at all.
    let floor = if matches!(fault, Fault::DatabaseSwitchover) {
        1.0
    } else {
        0.999
    };
    let mut carts = Vec::new();
    for o in outcomes.iter().filter(|o| o.order.is_err()) {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT cart_id::text, status FROM edge.carts WHERE user_id = $1 ORDER BY created_at",
        )
        .bind(&o.user)
        .fetch_all(&shop.pool)
        .await
        .unwrap_or_default();
        carts.push(format!(
            "{} was given cart {:?}, has {rows:?}",
            o.user, o.cart
        ));
    }
    assert!(
        share >= floor,
        "only {:.2} % accepted; the others' last answers: {refused:?}; their carts: {carts:?}",
        share * 100.0
    );
    assert_eq!(
        confirmed as usize,
        ids.len(),
        "every accepted order had stock and a good card"
    );

    // Nothing doubled: one order per buyer, one authorization per order, one movement of
    // each kind per order, and the stock adds up.
    let orders_by_user: Vec<(String, i64)> = sqlx::query_as(
        "SELECT user_id, count(*) FROM orders.orders GROUP BY 1 HAVING count(*) > 1",
    )
    .fetch_all(&shop.pool)
    .await
    .expect("orders by user");
    assert!(
        orders_by_user.is_empty(),
        "doubled orders: {orders_by_user:?}"
    );
    let stored: HashSet<String> =
        sqlx::query_as::<_, (uuid::Uuid,)>("SELECT order_id FROM edge.checkouts")
            .fetch_all(&shop.pool)
            .await
            .expect("checkouts")
            .into_iter()
            .map(|(id,)| id.to_string())
            .collect();
    let answered: HashSet<String> = accepted.iter().map(|(_, id)| (*id).to_owned()).collect();
    assert!(answered.is_subset(&stored));
    let doubled_moves: i64 = sqlx::query_as::<_, (i64,)>(
        "SELECT count(*) FROM (SELECT order_id, sku, kind FROM inventory.stock_movements \
         GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
    )
    .fetch_one(&shop.pool)
    .await
    .expect("movements")
    .0;
    assert_eq!(doubled_moves, 0, "a stock movement was recorded twice");
    let ledger: Value = shop
        .http
        .get(format!("{}/v1/ledger", shop.psp))
        .send()
        .await
        .expect("ledger")
        .json()
        .await
        .expect("ledger json");
    let mut authorizations: HashMap<String, usize> = HashMap::new();
    for entry in ledger["entries"].as_array().into_iter().flatten() {
        if entry["kind"] == "authorization" {
            *authorizations
                .entry(entry["reference"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
    }
    let doubled: Vec<_> = authorizations.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "doubled authorizations: {doubled:?}");
    let (on_hand, reserved): (i32, i32) =
        sqlx::query_as("SELECT on_hand, reserved FROM inventory.stock WHERE sku = $1")
            .bind(SKU)
            .fetch_one(&shop.pool)
            .await
            .expect("stock");
    let sold: i64 = sqlx::query_as::<_, (Option<i64>,)>(
        "SELECT sum(i.qty)::int8 FROM orders.order_items i JOIN orders.orders o USING (order_id) \
         WHERE o.status = 'confirmed'",
    )
    .fetch_one(&shop.pool)
    .await
    .expect("sold")
    .0
    .unwrap_or(0);
    assert_eq!((i64::from(on_hand), reserved), (STOCK - sold, 0));

    if let Some(elected) = elected {
        // Once the new leader is there, how long does any order pending at that moment still
        // wait for its end?
        let (resume_ms,): (f64,) = sqlx::query_as(
            "SELECT coalesce(max(extract(epoch FROM o.created_at - greatest(c.created_at, $1)) \
             * 1000), 0)::float8 FROM orders.orders o JOIN edge.checkouts c USING (order_id) \
             WHERE o.created_at > $1",
        )
        .bind(elected)
        .fetch_one(&shop.pool)
        .await
        .expect("resume");
        eprintln!(
            "after the new leader: longest wait for an end {:.1} s",
            resume_ms / 1000.0
        );
        // The target is 5 s (0.6-4.2 s measured alone); the bound leaves room for a loaded CI
        // machine, where the consumers' own leader elections (their groups lost a member too)
        // and a pull lost with its leader (pull_expires + 1 s) add up.
        assert!(
            resume_ms < 8_000.0,
            "the saga took {:.1} s to resume after the new leader",
            resume_ms / 1000.0
        );
    }
    if let Fault::StreamLeader = fault {
        // The restarted node caught up: its copy of the stream ends where the leader's does.
        eventually(
            "the restarted node to catch up",
            Duration::from_secs(30),
            || async {
                let Some(leader) = shop.cluster.leader_of("CHECKOUT").await else {
                    return false;
                };
                let last = |d: Option<Value>| d.and_then(|d| d["state"]["last_seq"].as_u64());
                let theirs = last(shop.cluster.stream(leader, "CHECKOUT").await);
                let ours = last(shop.cluster.stream(killed, "CHECKOUT").await);
                theirs.is_some() && theirs == ours
            },
        )
        .await;
    }
    if let (Some(heartbeat), Database::Ha(pg)) = (heartbeat, &shop.db) {
        heartbeat.finish(&shop.pool, killed).await;
        if let Fault::DatabasePrimary = fault {
            pg.wait_secondary(killed, Duration::from_secs(90)).await;
            eprintln!("the old primary (node {killed}) is a standby again");
        }
        assert!(
            worst_answer < Duration::from_secs(15),
            "a buyer waited {:.1} s for a checkout to be accepted",
            worst_answer.as_secs_f64()
        );
    }
    audit(&shop.pool, &shop.psp, &shop.settings).await;
    // Stall bound: an election (a few seconds), a pull that outlives its expiry (about
    // pull_expires + 1 s) and a step's in-process publish retry; ack_wait (3 s here) for
    // messages a killed process held.
    assert!(
        stall_ms < 15_000.0,
        "an accepted order waited {:.1} s for its end",
        stall_ms / 1000.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_stream_leader_under_load_loses_and_doubles_nothing() {
    failover(Fault::StreamLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_one_of_two_processes_under_load_loses_and_doubles_nothing() {
    failover(Fault::Process).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_database_primary_under_load_loses_and_doubles_nothing() {
    failover(Fault::DatabasePrimary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_switchover_under_load_refuses_no_buyer() {
    failover(Fault::DatabaseSwitchover).await;
}

/// Breaks what `fault` names; answers what was broken (a node or process index) and, for a
/// stream leader, when the survivors elected a new one (within `down_for`).
async fn break_it(
    fault: Fault,
    shop: &mut Shop,
    down_for: Duration,
) -> (usize, Option<chrono::DateTime<chrono::Utc>>) {
    let mut elected = None;
    let killed = match fault {
        Fault::StreamLeader => {
            let leader = shop
                .cluster
                .leader_of("CHECKOUT")
                .await
                .expect("the CHECKOUT stream has a leader");
            shop.cluster.nodes[leader].kill();
            let killed_at = Instant::now();
            eprintln!(
                "killed nats-server {} (CHECKOUT leader)",
                shop.cluster.nodes[leader].name
            );
            // When the survivors report a new leader: the saga should resume within seconds.
            let deadline = killed_at + down_for;
            while Instant::now() < deadline {
                if shop
                    .cluster
                    .leader_of("CHECKOUT")
                    .await
                    .is_some_and(|l| l != leader)
                {
                    elected = Some(chrono::Utc::now());
                    eprintln!(
                        "new CHECKOUT leader after {:.1} s",
                        killed_at.elapsed().as_secs_f64()
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            leader
        }
        Fault::Process => {
            shop.processes[0].kill();
            eprintln!("killed checkout process 1 (edge 1 and one of every consumer role)");
            0
        }
        Fault::DatabasePrimary => {
            let Database::Ha(pg) = &mut shop.db else {
                unreachable!("a database fault runs on an HA group")
            };
            let primary = pg.primary().await.expect("the group has a primary");
            tokio::task::block_in_place(|| pg.kill(primary));
            eprintln!("killed the PostgreSQL primary (node {primary})");
            primary
        }
        Fault::DatabaseSwitchover => {
            let Database::Ha(pg) = &shop.db else {
                unreachable!("a database fault runs on an HA group")
            };
            let primary = pg.primary().await.expect("the group has a primary");
            let asked = Instant::now();
            pg.switchover().await;
            eprintln!(
                "switched the PostgreSQL primary over from node {primary} in {:.1} s",
                asked.elapsed().as_secs_f64()
            );
            primary
        }
    };
    (killed, elected)
}

/// Brings back what [`break_it`] broke (a switchover needs nothing).
fn mend(fault: Fault, shop: &mut Shop, killed: usize) {
    match fault {
        Fault::StreamLeader => {
            let node = &mut shop.cluster.nodes[killed];
            tokio::task::block_in_place(|| node.start());
        }
        Fault::Process => shop.processes[0].restart(),
        Fault::DatabasePrimary => {
            if let Database::Ha(pg) = &mut shop.db {
                tokio::task::block_in_place(|| pg.restart(killed));
                eprintln!("started the old primary (node {killed}) again");
            }
        }
        Fault::DatabaseSwitchover => {}
    }
}

/// Writes one row every 50 ms to each PostgreSQL node straight (not through the services),
/// noting which commits each node acknowledged: the failover time is the gap between the last
/// commit on the old primary and the first on the new, and every acknowledged row must still
/// be there afterwards (nothing acknowledged is lost: RPO 0).
struct Heartbeat {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Vec<(usize, Instant)>>,
}

impl Heartbeat {
    async fn start(pg: &PgCluster) -> Self {
        use sqlx::Connection;
        let urls: Vec<String> = (0..2)
            .map(|i| format!("postgres://postgres@127.0.0.1:{}/checkout", pg.port(i)))
            .collect();
        let primary = pg.primary().await.expect("a primary");
        let mut setup = sqlx::PgConnection::connect(&urls[primary])
            .await
            .expect("the primary answers");
        sqlx::query("CREATE TABLE IF NOT EXISTS ha_heartbeat (node int NOT NULL)")
            .execute(&mut setup)
            .await
            .expect("heartbeat table");
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut conns: Vec<Option<sqlx::PgConnection>> = vec![None, None];
                let mut acked = Vec::new();
                while !stop.is_cancelled() {
                    for (i, url) in urls.iter().enumerate() {
                        if let Some(at) = beat(&mut conns[i], url, i).await {
                            acked.push((i, at));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                acked
            }
        });
        Self { stop, task }
    }

    /// Stops, prints the failover time, and checks every acknowledged row survived.
    async fn finish(self, pool: &sqlx::PgPool, old: usize) {
        self.stop.cancel();
        let acked = self.task.await.expect("heartbeat ran");
        let last_old = acked
            .iter()
            .filter(|(n, _)| *n == old)
            .map(|(_, t)| *t)
            .max();
        let first_new = acked
            .iter()
            .filter(|(n, t)| *n != old && last_old.is_some_and(|l| *t > l))
            .map(|(_, t)| *t)
            .min();
        if let (Some(last), Some(first)) = (last_old, first_new) {
            let gap = first - last;
            eprintln!(
                "failover time (last commit on the old primary to the first on the new): {:.1} s",
                gap.as_secs_f64()
            );
            assert!(gap < Duration::from_secs(15), "failover took {gap:?}");
        }
        for node in 0..2 {
            let acknowledged = acked.iter().filter(|(n, _)| *n == node).count();
            let (kept,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM ha_heartbeat WHERE node = $1")
                    .bind(i32::try_from(node).expect("node"))
                    .fetch_one(pool)
                    .await
                    .expect("heartbeat rows");
            // An insert that timed out may have committed unacknowledged: at least, not equal.
            assert!(
                kept as usize >= acknowledged,
                "node {node} acknowledged {acknowledged} commits, only {kept} are there"
            );
        }
    }
}

/// One heartbeat commit on one node: when it was acknowledged, or None (down or a standby).
async fn beat(conn: &mut Option<sqlx::PgConnection>, url: &str, node: usize) -> Option<Instant> {
    use sqlx::Connection;
    if conn.is_none() {
        let connect = sqlx::PgConnection::connect(url);
        *conn = tokio::time::timeout(Duration::from_millis(500), connect)
            .await
            .ok()?
            .ok();
    }
    let insert = sqlx::query("INSERT INTO ha_heartbeat (node) VALUES ($1)")
        .bind(i32::try_from(node).ok()?)
        .execute(conn.as_mut()?);
    match tokio::time::timeout(Duration::from_millis(500), insert).await {
        Ok(Ok(_)) => Some(Instant::now()),
        Ok(Err(e)) if e.as_database_error().is_some() => None,
        _ => {
            *conn = None;
            None
        }
    }
}
