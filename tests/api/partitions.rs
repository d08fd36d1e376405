//! Orders sharded by order id: with `nats.partitions = 3` on a 3-node cluster, the servers'
//! `{{partition(3,2)}}` mapping spreads checkouts over three streams whose leaders sit on
//! different nodes, the code's `partition_of` agrees with the servers, and a role whose
//! processes each own different partitions still runs every order to its end.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use checkout::app::{App, Role};
use checkout::bus::Bus;
use checkout::saga::events::Event;
use checkout::saga::subjects::partition_of;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::cluster::Cluster;
use crate::helpers::{
    checkout_body, eventually, test_settings, test_settings_on, NatsServer, SandboxPsp, TestDb,
};

/// What `nats/cluster/partitions.conf` says, for K = 3.
const MAPPING: &str = r#"mappings = {
  "checkout.*.*": "checkout.{{wildcard(1)}}.{{wildcard(2)}}.{{partition(3,2)}}"
}"#;

const ORDERS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_partitions_spread_over_the_nodes_and_split_between_processes() {
    let cluster = Cluster::start_with(MAPPING);
    cluster.wait_formed().await;
    let db = TestDb::new();
    let mut settings = test_settings_on(cluster.url(), &db);
    settings.nats.replicas = 3;
    settings.nats.partitions = 3;
    settings.payments.rate_limit_per_s = 100_000.0;
    let psp = SandboxPsp::start().await;
    settings.psp.url = psp.url().to_owned();
    let main = App::build(
        settings.clone(),
        &[Role::Edge, Role::Order, Role::Compensate],
    )
    .await
    .expect("edge, order and compensate start");
    let base = format!("http://{}", main.http_addr().expect("edge"));
    // Reserve and authorize each run as two processes owning different partitions.
    let mut split = Vec::new();
    for (role, own) in [
        (Role::Reserve, vec![0]),
        (Role::Reserve, vec![1, 2]),
        (Role::Authorize, vec![0, 2]),
        (Role::Authorize, vec![1]),
    ] {
        let mut s = settings.clone();
        s.nats.own_partitions = own;
        split.push(App::build(s, &[role]).await.expect("a split role starts"));
    }

    let bus = Bus::connect(&settings.nats).await.expect("bus");
    let leaders = bus.spread_leaders().await.expect("leaders spread");
    let nodes: HashSet<&str> = leaders.iter().map(|(_, l)| l.as_str()).collect();
    eprintln!("partition leaders: {leaders:?}");
    assert_eq!(leaders.len(), 3);
    assert!(
        nodes.len() > 1,
        "every partition led by one node: {leaders:?}"
    );

    let http = reqwest::Client::new();
    let secret = settings.auth.jwt_secret.expose().to_owned();
    let mint = |user: &str, admin: bool| {
        checkout::auth::mint(&secret, user, admin, Duration::from_secs(3600)).expect("token")
    };
    let admin = mint("admin", true);
    for (path, body) in [
        (
            "/api/admin/products/TEE",
            json!({"name": "Tee", "price": "12.50", "currency": "USD", "weightGrams": 200}),
        ),
        ("/api/admin/stock/TEE", json!({"onHand": 1000})),
    ] {
        let resp = http
            .put(format!("{base}{path}"))
            .bearer_auth(&admin)
            .json(&body)
            .send()
            .await
            .expect("admin request");
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let mut orders = Vec::new();
    for n in 0..ORDERS {
        let token = mint(&format!("buyer-{n}"), false);
        let cart: Value = http
            .post(format!("{base}/api/cart/items"))
            .bearer_auth(&token)
            .json(&json!({"sku": "TEE", "qty": 1}))
            .send()
            .await
            .expect("cart")
            .json()
            .await
            .expect("cart json");
        let cart_id = cart["cartId"].as_str().expect("cart id");
        let placed = http
            .post(format!("{base}/api/checkout"))
            .bearer_auth(&token)
            .header("Idempotency-Key", "k")
            .json(&checkout_body(cart_id, "tok_visa"))
            .send()
            .await
            .expect("checkout");
        assert_eq!(placed.status(), StatusCode::ACCEPTED);
        let body: Value = placed.json().await.expect("checkout json");
        let id: uuid::Uuid = body["orderId"].as_str().expect("id").parse().expect("uuid");
        orders.push((token, id));
    }

    let pool = sqlx::PgPool::connect(&db.url).await.expect("pool");
    eventually("every order confirmed", Duration::from_secs(60), || async {
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM orders.orders WHERE status = 'confirmed'")
                .fetch_one(&pool)
                .await
                .expect("count");
        n as usize == ORDERS
    })
    .await;

    // Every partition got orders, and each message sits where `partition_of` says.
    let js = bus.jetstream();
    let mut per_partition: HashMap<u32, HashSet<uuid::Uuid>> = HashMap::new();
    for p in 0..3u32 {
        let stream = js
            .get_stream(format!("CHECKOUT-{p}"))
            .await
            .expect("partition stream");
        let last = stream.get_info().await.expect("info").state.last_sequence;
        for seq in 1..=last {
            let message = stream.get_raw_message(seq).await.expect("message");
            assert!(
                message.subject.ends_with(&format!(".{p}")),
                "{}",
                message.subject
            );
            let event = Event::decode(&message.payload).expect("a saga event");
            let order = event.checkout().order_id;
            assert_eq!(
                partition_of(order, 3),
                p,
                "{} in CHECKOUT-{p}",
                message.subject
            );
            per_partition.entry(p).or_default().insert(order);
        }
    }
    let counts: Vec<usize> = (0..3)
        .map(|p| per_partition.get(&p).map_or(0, HashSet::len))
        .collect();
    eprintln!("orders per partition: {counts:?}");
    assert!(counts.iter().all(|n| *n > 0), "{counts:?}");
    assert_eq!(counts.iter().sum::<usize>(), ORDERS);

    // The timeline finds an order's events in its partition.
    let (token, id) = &orders[0];
    let timeline: Value = http
        .get(format!("{base}/api/orders/{id}/events"))
        .bearer_auth(token)
        .send()
        .await
        .expect("timeline")
        .json()
        .await
        .expect("timeline json");
    let kinds: Vec<&str> = timeline["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert!(kinds.contains(&"confirmed"), "{timeline}");
    drop(split);
}

/// A single server with `MAPPING`, for tests that need partitions but not a cluster.
pub fn partitioned_server(dir: &tempfile::TempDir) -> NatsServer {
    let config = dir.path().join("partitions.conf");
    std::fs::write(&config, MAPPING).expect("config written");
    NatsServer::start_with_config(config, Vec::new(), "nats")
}

/// An order id whose events the mapping sends to partition `p` of 3.
pub fn order_in_partition(p: u32) -> uuid::Uuid {
    std::iter::repeat_with(uuid::Uuid::new_v4)
        .find(|id| partition_of(*id, 3) == p)
        .expect("some id lands in every partition")
}

#[tokio::test]
async fn poison_messages_at_the_same_sequence_of_two_partitions_are_both_dead_lettered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = partitioned_server(&dir);
    let db = TestDb::new();
    let mut settings = test_settings(&nats, &db);
    settings.nats.partitions = 3;
    let _reserve = App::build(settings.clone(), &[Role::Reserve])
        .await
        .expect("reserve starts");
    let bus = Bus::connect(&settings.nats).await.expect("bus");
    let js = bus.jetstream();
    // Each partition's stream counts from 1: both poison messages are sequence 1.
    for p in [0, 1] {
        let ack = js
            .publish(
                format!("checkout.requested.{}", order_in_partition(p)),
                bytes::Bytes::from_static(b"\xc1 not msgpack"),
            )
            .await
            .expect("publish")
            .await
            .expect("stored");
        assert_eq!(
            (ack.stream.as_str(), ack.sequence),
            (format!("CHECKOUT-{p}").as_str(), 1)
        );
    }
    let dead = js.get_stream("DEADLETTER").await.expect("dead letters");
    eventually(
        "both poison messages dead-lettered",
        Duration::from_secs(20),
        || {
            let mut dead = dead.clone();
            async move { dead.info().await.is_ok_and(|i| i.state.messages == 2) }
        },
    )
    .await;
    let mut streams: Vec<String> = Vec::new();
    for seq in 1..=2 {
        let letter = dead.get_raw_message(seq).await.expect("dead letter");
        let header = letter
            .headers
            .get("Checkout-Dead-Stream")
            .map(ToString::to_string);
        streams.push(header.expect("the stream it came from"));
    }
    streams.sort();
    assert_eq!(streams, ["CHECKOUT-0", "CHECKOUT-1"]);
}

/// Starts `roles` with `nats.partitions = k` against `nats`; the start-up error, if any.
async fn start_with_partitions(nats: &NatsServer, db: &TestDb, k: u32) -> Option<String> {
    let mut settings = test_settings(nats, db);
    settings.nats.partitions = k;
    let started = tokio::time::timeout(
        Duration::from_secs(20),
        App::build(settings, &[Role::Reserve]),
    )
    .await
    .expect("start-up ends within seconds");
    started.err().map(|e| format!("{e:#}"))
}

#[tokio::test]
async fn partitions_that_disagree_with_the_servers_mapping_refuse_to_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = TestDb::new();
    // The servers map to 3 partitions (a fresh server each time: no streams of another K).
    for k in [1, 2, 4] {
        let mapped = partitioned_server(&dir);
        let error = start_with_partitions(&mapped, &db, k)
            .await
            .unwrap_or_else(|| panic!("nats.partitions = {k} started against a mapping of 3"));
        assert!(error.contains("nats.partitions"), "{error}");
    }
    let mapped = partitioned_server(&dir);
    assert_eq!(start_with_partitions(&mapped, &db, 3).await, None);
    // No mapping at all.
    let plain = NatsServer::start();
    let error = start_with_partitions(&plain, &db, 3)
        .await
        .expect("nats.partitions = 3 started without a mapping");
    assert!(error.contains("no mapping"), "{error}");
    assert_eq!(
        start_with_partitions(&NatsServer::start(), &db, 1).await,
        None
    );
    // No probe was ever stored.
    let bus = Bus::connect(&test_settings(&mapped, &db).nats)
        .await
        .expect("bus");
    for p in 0..3 {
        let mut stream = bus
            .jetstream()
            .get_stream(format!("CHECKOUT-{p}"))
            .await
            .expect("partition stream");
        assert_eq!(stream.info().await.expect("info").state.messages, 0);
    }
}
