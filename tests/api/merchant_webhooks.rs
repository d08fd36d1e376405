//! Merchant webhooks (#30), held by an outside implementation: every delivery is verified by a
//! receiver in Python using the Standard Webhooks reference library (`standardwebhooks` on
//! PyPI), never by our own code.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::TestApp;

/// A receiver process on its own port.
struct Receiver {
    port: u16,
    secret: String,
    delay: f64,
    child: Option<Child>,
}

impl Receiver {
    /// A receiver for `secret` on a free port, not started.
    fn new(secret: &str, delay: f64) -> Self {
        Self {
            port: crate::helpers::port(),
            secret: secret.to_owned(),
            delay,
            child: None,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks", self.port)
    }

    /// Starts it (afresh: it remembers nothing of an earlier run) and waits until it answers.
    async fn start(&mut self) {
        let root = env!("CARGO_MANIFEST_DIR");
        let child = Command::new(format!("{root}/.venv/bin/python"))
            .arg(format!(
                "{root}/tests/receiver/standard_webhooks_receiver.py"
            ))
            .args(["--port", &self.port.to_string(), "--secret", &self.secret])
            .args(["--delay", &self.delay.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("the receiver starts (./dev tools installs standardwebhooks)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.received().await.is_none() {
            assert!(Instant::now() < deadline, "the receiver never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What it accepted and how many it refused (None while it is down).
    async fn received(&self) -> Option<(Vec<Value>, u64)> {
        let body: Value = reqwest::get(format!("http://127.0.0.1:{}/received", self.port))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let accepted = body["accepted"].as_array().cloned().unwrap_or_default();
        Some((accepted, body["rejected"].as_u64().unwrap_or(0)))
    }

    async fn accepted(&self) -> Vec<Value> {
        self.received().await.map(|r| r.0).unwrap_or_default()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Registers an endpoint for `events`; its id and secret.
pub(crate) async fn register(app: &TestApp, url: &str, events: &[&str]) -> (String, String) {
    let (status, body) = app
        .request(Method::POST, "/api/admin/webhooks")
        .token(&app.admin())
        .json(json!({"url": url, "events": events, "description": "test receiver"}))
        .send()
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let secret = body["secret"].as_str().expect("secret").to_owned();
    assert!(secret.starts_with("whsec_"), "{body}");
    (body["id"].as_str().expect("id").to_owned(), secret)
}

/// Registers an endpoint for a receiver made with its secret.
async fn receiver_for(app: &TestApp, events: &[&str], delay: f64) -> (String, Receiver) {
    let mut receiver = Receiver::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", delay);
    let (id, secret) = register(app, &receiver.url(), events).await;
    receiver.secret = secret;
    (id, receiver)
}

async fn deliveries(app: &TestApp, endpoint: &str) -> Vec<Value> {
    let (status, body) = app
        .request(
            Method::GET,
            format!("/api/admin/webhooks/{endpoint}/deliveries"),
        )
        .token(&app.admin())
        .send()
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["deliveries"].as_array().cloned().unwrap_or_default()
}

/// Asks for everything since `since` again.
async fn replay(
    app: &TestApp,
    endpoint: &str,
    since: chrono::DateTime<chrono::Utc>,
) -> (StatusCode, Value) {
    app.request(
        Method::POST,
        format!("/api/admin/webhooks/{endpoint}/replay"),
    )
    .token(&app.admin())
    .json(json!({"since": since}))
    .send()
    .await
}

/// Turns an endpoint back on.
async fn enable(app: &TestApp, endpoint: &str) -> (StatusCode, Value) {
    app.request(
        Method::POST,
        format!("/api/admin/webhooks/{endpoint}/enable"),
    )
    .token(&app.admin())
    .send()
    .await
}

async fn disable(app: &TestApp, endpoint: &str) -> (StatusCode, Value) {
    app.request(
        Method::POST,
        format!("/api/admin/webhooks/{endpoint}/disable"),
    )
    .token(&app.admin())
    .send()
    .await
}

/// Waits until the endpoint has been disabled for failing.
async fn disabled(app: &TestApp, endpoint: &str) {
    app.eventually("the endpoint disabled", || async {
        let (_, body) = app
            .request(Method::GET, format!("/api/admin/webhooks/{endpoint}"))
            .token(&app.admin())
            .send()
            .await;
        body["status"] == "disabled"
    })
    .await;
}

/// Attempts in a delivery log, all deliveries together.
fn failed_attempts(log: &[Value]) -> usize {
    log.iter()
        .map(|d| d["attempts"].as_array().map_or(0, Vec::len))
        .sum()
}

/// Ids of what a receiver accepted: every one once, and how many there are.
fn unique_ids(accepted: &[Value]) -> HashSet<String> {
    let ids: Vec<String> = accepted
        .iter()
        .filter_map(|a| a["id"].as_str().map(str::to_owned))
        .collect();
    let unique: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(unique.len(), ids.len(), "a message arrived twice: {ids:?}");
    unique
}

#[tokio::test]
async fn every_order_event_reaches_the_endpoint_signed_as_the_specification_says() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 10).await;
    let (endpoint, mut receiver) = receiver_for(
        &app,
        &[
            "order.confirmed",
            "order.shipped",
            "order.refunded",
            "order.failed",
        ],
        0.0,
    )
    .await;
    receiver.start().await;
    let (token, id) = app.buy("alice", "TEE", "tok_visa").await;
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    assert_eq!(app.ship(&id).await.0, StatusCode::ACCEPTED);
    app.eventually("shipped", || async {
        app.order(&token, &id).await.1["status"] == "shipped"
    })
    .await;
    assert_eq!(app.refund(&id).await.0, StatusCode::ACCEPTED);
    let (_, declined) = app.buy("bob", "TEE", "tok_declined").await;
    app.eventually(
        "four messages verified by the reference library",
        || async { receiver.accepted().await.len() == 4 },
    )
    .await;
    let accepted = receiver.accepted().await;
    unique_ids(&accepted);
    let kinds: Vec<(&str, &str)> = accepted
        .iter()
        .map(|a| {
            (
                a["type"].as_str().unwrap_or(""),
                a["orderId"].as_str().unwrap_or(""),
            )
        })
        .collect();
    for expected in [
        ("order.confirmed", id.as_str()),
        ("order.shipped", id.as_str()),
        ("order.refunded", id.as_str()),
        ("order.failed", declined.as_str()),
    ] {
        assert!(kinds.contains(&expected), "{expected:?} not in {kinds:?}");
    }
    assert_eq!(receiver.received().await.map(|r| r.1), Some(0));
    let log = deliveries(&app, &endpoint).await;
    assert_eq!(log.len(), 4);
    // Each taken at its first try, recorded with its batch: one attempt, with its answer.
    assert!(
        log.iter().all(|d| d["status"] == "delivered"
            && d["deliveredAt"].is_string()
            && d["attempts"].as_array().is_some_and(|a| a.len() == 1
                && a[0]["attempt"] == 1
                && a[0]["statusCode"] == 204
                && a[0]["latencyMs"].is_i64())),
        "{log:?}"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM webhooks.deliveries").await,
        0,
        "a message taken at its first try leaves no row of its own"
    );
    // The secret is shown once: never again.
    let (_, listed) = app
        .request(Method::GET, "/api/admin/webhooks")
        .token(&app.admin())
        .send()
        .await;
    assert!(listed[0]["secret"].is_null(), "{listed}");
}

#[tokio::test]
async fn a_receiver_down_then_back_gets_everything_once_by_id() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 10).await;
    let (endpoint, mut receiver) = receiver_for(&app, &["order.confirmed"], 0.0).await;
    let mut orders = Vec::new();
    for i in 0..5 {
        orders.push(app.buy(&format!("buyer-{i}"), "TEE", "tok_visa").await);
    }
    app.eventually(
        "deliveries failing and retried while it is down",
        || async {
            let log = deliveries(&app, &endpoint).await;
            log.len() == 5
                && log.iter().all(|d| d["status"] == "pending")
                && failed_attempts(&log) >= 6
        },
    )
    .await;
    receiver.start().await;
    app.eventually("all five arrive", || async {
        receiver.accepted().await.len() >= 5
    })
    .await;
    app.eventually("all five delivered", || async {
        deliveries(&app, &endpoint)
            .await
            .iter()
            .all(|d| d["status"] == "delivered")
    })
    .await;
    let ids = unique_ids(&receiver.accepted().await);
    assert_eq!(ids.len(), 5);
}

#[tokio::test]
async fn a_slow_receiver_does_not_delay_a_healthy_one() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 20).await;
    let (_, mut slow) = receiver_for(&app, &["order.confirmed"], 2.0).await;
    let (_, mut healthy) = receiver_for(&app, &["order.confirmed"], 0.0).await;
    slow.start().await;
    healthy.start().await;
    let started = Instant::now();
    for i in 0..10 {
        let (token, id) = app.buy(&format!("buyer-{i}"), "TEE", "tok_visa").await;
        assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    }
    app.eventually("the healthy endpoint has all ten", || async {
        healthy.accepted().await.len() == 10
    })
    .await;
    // The slow one answers each message 2 s after it came: while the healthy one already has
    // all ten, the slow one cannot have the last of them yet.
    let slow_so_far = slow.accepted().await.len();
    assert!(
        slow_so_far < 10,
        "the healthy endpoint waited for the slow one ({slow_so_far} slow deliveries done in {:?})",
        started.elapsed()
    );
    app.eventually("the slow one gets them all too", || async {
        slow.accepted().await.len() == 10
    })
    .await;
}

#[tokio::test]
async fn a_receiver_with_the_wrong_secret_refuses_and_the_delivery_is_retried() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 10).await;
    let (endpoint, mut receiver) = receiver_for(&app, &["order.confirmed"], 0.0).await;
    receiver.secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into();
    receiver.start().await;
    app.buy("alice", "TEE", "tok_visa").await;
    app.eventually("refused twice, and still pending", || async {
        let log = deliveries(&app, &endpoint).await;
        log.first().is_some_and(|d| {
            d["status"] == "pending"
                && d["attempts"]
                    .as_array()
                    .is_some_and(|a| a.len() >= 2 && a.iter().all(|x| x["statusCode"] == 400))
        })
    })
    .await;
    assert!(receiver.accepted().await.is_empty());
    assert!(receiver.received().await.is_some_and(|r| r.1 >= 2));
}

#[tokio::test]
async fn replay_sends_again_what_a_receiver_lost_with_the_same_ids() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 10).await;
    let since = chrono::Utc::now() - chrono::Duration::seconds(1);
    let (endpoint, mut receiver) = receiver_for(&app, &["order.confirmed"], 0.0).await;
    receiver.start().await;
    for i in 0..3 {
        app.buy(&format!("buyer-{i}"), "TEE", "tok_visa").await;
    }
    app.eventually("three arrive", || async {
        receiver.accepted().await.len() == 3
    })
    .await;
    let first = unique_ids(&receiver.accepted().await);
    // The shop's system loses its data.
    receiver.stop();
    receiver.start().await;
    assert!(receiver.accepted().await.is_empty());
    let (status, body) = replay(&app, &endpoint, since).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["queued"], 3, "{body}");
    app.eventually("three arrive again", || async {
        receiver.accepted().await.len() == 3
    })
    .await;
    assert_eq!(unique_ids(&receiver.accepted().await), first);
    // The log keeps both deliveries of each message: the first, then the replay's.
    app.eventually("the log shows two successes per message", || async {
        let log = deliveries(&app, &endpoint).await;
        log.len() == 3
            && log.iter().all(|d| {
                d["status"] == "delivered"
                    && d["attempts"]
                        .as_array()
                        .is_some_and(|a| a.len() == 2 && a.iter().all(|x| x["statusCode"] == 204))
            })
    })
    .await;
}

#[tokio::test]
async fn a_rotated_secret_signs_beside_the_old_one_during_the_overlap() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 10).await;
    let (endpoint, mut old) = receiver_for(&app, &["order.confirmed"], 0.0).await;
    let (status, rotated) = app
        .request(
            Method::POST,
            format!("/api/admin/webhooks/{endpoint}/rotate"),
        )
        .token(&app.admin())
        .json(json!({"overlap": "1h"}))
        .send()
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_secret = rotated["secret"].as_str().expect("secret").to_owned();
    assert_ne!(new_secret, old.secret);
    // The receiver still on the old secret accepts, and so would one on the new.
    old.start().await;
    app.buy("alice", "TEE", "tok_visa").await;
    app.eventually("accepted on the old secret", || async {
        old.accepted().await.len() == 1
    })
    .await;
    old.stop();
    let mut new = Receiver::new(&new_secret, 0.0);
    new.port = old.port;
    new.start().await;
    app.buy("bob", "TEE", "tok_visa").await;
    app.eventually("accepted on the new secret", || async {
        new.accepted().await.len() == 1
    })
    .await;
}

#[tokio::test]
async fn bad_endpoints_are_refused_and_private_targets_need_the_setting() {
    let app = TestApp::spawn_with(|s| s.webhooks.allow_private_targets = false).await;
    let admin = app.admin();
    for (body, code) in [
        (
            json!({"url": "http://127.0.0.1:9/h", "events": ["order.confirmed"]}),
            "invalid_webhook_url",
        ),
        (
            json!({"url": "http://169.254.169.254/latest", "events": ["order.confirmed"]}),
            "invalid_webhook_url",
        ),
        (
            json!({"url": "ftp://shop.example/h", "events": ["order.confirmed"]}),
            "invalid_webhook_url",
        ),
        (
            json!({"url": "https://93.184.216.34/h", "events": ["order.teleported"]}),
            "invalid_events",
        ),
        (
            json!({"url": "https://93.184.216.34/h", "events": []}),
            "invalid_events",
        ),
    ] {
        let (status, reply) = app
            .request(Method::POST, "/api/admin/webhooks")
            .token(&admin)
            .json(body.clone())
            .send()
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body} -> {reply}"
        );
        assert_eq!(reply["error"]["code"], code, "{body} -> {reply}");
    }
    let (status, _) = app
        .request(Method::POST, "/api/admin/webhooks")
        .token(&app.token("alice"))
        .json(json!({"url": "https://93.184.216.34/h", "events": ["order.confirmed"]}))
        .send()
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        app.count("SELECT count(*) FROM webhooks.endpoints").await,
        0
    );
}

#[tokio::test]
async fn killing_the_delivering_process_mid_retry_loses_nothing() {
    use checkout::app::{App, Role};

    // The order role (which feeds and sends webhooks) as a real process we can SIGKILL.
    let nats = crate::helpers::NatsServer::start();
    let db = crate::helpers::TestDb::new();
    let mut settings = crate::helpers::test_settings(&nats, &db);
    let psp = crate::helpers::SandboxPsp::start().await;
    settings.psp.url = psp.url().to_owned();
    let roles = [Role::Edge, Role::Reserve, Role::Authorize, Role::Compensate];
    let app = App::build(settings.clone(), &roles)
        .await
        .expect("app starts");
    let app = TestApp::attach(app, settings, psp, nats, db).await;
    let spawn_order = || {
        let mut env = crate::helpers::process_env(&app.settings, crate::helpers::port(), &app.psp);
        env.push(("CHECKOUT__NATS__ACK_WAIT".into(), "2s".into()));
        env.push(("CHECKOUT__WEBHOOKS__TIMEOUT".into(), "2s".into()));
        crate::helpers::CheckoutProcess::start("order", env)
    };
    app.product("TEE", "10.00", 10).await;
    let (endpoint, mut receiver) = receiver_for(&app, &["order.confirmed"], 0.0).await;
    let mut first = spawn_order();
    for i in 0..5 {
        let (token, id) = app.buy(&format!("buyer-{i}"), "TEE", "tok_visa").await;
        assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    }
    // The receiver is down: every delivery is being retried when the process dies.
    app.eventually("deliveries failing and retried", || async {
        let log = deliveries(&app, &endpoint).await;
        log.len() == 5 && failed_attempts(&log) >= 6
    })
    .await;
    first.kill();
    receiver.start().await;
    let mut second = spawn_order();
    app.eventually("all five delivered", || async {
        let log = deliveries(&app, &endpoint).await;
        log.len() == 5 && log.iter().all(|d| d["status"] == "delivered")
    })
    .await;
    second.kill();
    assert_eq!(unique_ids(&receiver.accepted().await).len(), 5);
}

#[tokio::test]
async fn an_endpoint_failing_for_the_whole_retry_period_is_disabled_and_its_deliveries_end() {
    let app = TestApp::spawn_with(|s| s.webhooks.retry_period = Duration::from_secs(2)).await;
    app.product("TEE", "10.00", 10).await;
    let (endpoint, _never_started) = receiver_for(&app, &["order.confirmed"], 0.0).await;
    app.buy("alice", "TEE", "tok_visa").await;
    disabled(&app, &endpoint).await;
    let log = deliveries(&app, &endpoint).await;
    assert_eq!(log[0]["status"], "failed", "{log:?}");
    // The shop fixes its endpoint and turns it back on.
    let (status, body) = enable(&app, &endpoint).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "enabled");
}

#[tokio::test]
async fn an_endpoint_disabled_by_hand_is_sent_nothing_until_it_is_enabled() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 10).await;
    let (endpoint, mut paused) = receiver_for(&app, &["order.confirmed"], 0.0).await;
    let (_, mut other) = receiver_for(&app, &["order.confirmed"], 0.0).await;
    paused.start().await;
    other.start().await;
    let (status, body) = disable(&app, &endpoint).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "disabled", "{body}");
    assert_eq!(body["disabledReason"], "disabled by an admin", "{body}");
    assert_eq!(disable(&app, &endpoint).await.0, StatusCode::OK, "twice");
    let unknown = uuid::Uuid::new_v4().to_string();
    assert_eq!(disable(&app, &unknown).await.0, StatusCode::NOT_FOUND);
    // An order while it is off: the other endpoint hears it, so its message is stored.
    let (_, carol) = app.buy("carol", "TEE", "tok_visa").await;
    app.eventually("the other endpoint heard carol's order", || async {
        other.accepted().await.len() == 1
    })
    .await;
    let (status, body) = enable(&app, &endpoint).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "enabled", "{body}");
    let (_, bob) = app.buy("bob", "TEE", "tok_visa").await;
    app.eventually("the endpoint, on again, heard an order", || async {
        !paused.accepted().await.is_empty()
    })
    .await;
    // Bob's, not carol's: what came while it was off is a replay away.
    let heard = paused.accepted().await;
    assert_eq!(
        heard[0]["orderId"],
        bob.as_str(),
        "carol {carol}: {heard:?}"
    );
}

#[tokio::test]
async fn a_reenabled_endpoint_hears_what_comes_after_and_a_replay_sends_what_it_missed() {
    let app = TestApp::spawn_with(|s| s.webhooks.retry_period = Duration::from_secs(2)).await;
    let since = chrono::Utc::now() - chrono::Duration::seconds(1);
    app.product("TEE", "10.00", 10).await;
    let (endpoint, mut fixed) = receiver_for(&app, &["order.confirmed"], 0.0).await;
    let (_, mut other) = receiver_for(&app, &["order.confirmed"], 0.0).await;
    other.start().await;
    let (_, alice) = app.buy("alice", "TEE", "tok_visa").await;
    disabled(&app, &endpoint).await;
    // An order while it is disabled: the other endpoint hears it, so its message is stored.
    let (_, carol) = app.buy("carol", "TEE", "tok_visa").await;
    app.eventually("the other endpoint heard both", || async {
        other.accepted().await.len() == 2
    })
    .await;
    fixed.start().await;
    let (status, body) = enable(&app, &endpoint).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, bob) = app.buy("bob", "TEE", "tok_visa").await;
    app.eventually("bob's order delivered to the fixed endpoint", || async {
        deliveries(&app, &endpoint)
            .await
            .iter()
            .any(|d| d["orderId"] == bob.as_str() && d["status"] == "delivered")
    })
    .await;
    // Like a new endpoint from then on: what it missed (alice's, given up; carol's, while it
    // was off) is a replay away, not sent by itself.
    let heard: Vec<String> = fixed
        .accepted()
        .await
        .iter()
        .filter_map(|a| a["orderId"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        heard,
        std::slice::from_ref(&bob),
        "alice {alice}, carol {carol}"
    );
    // The shop asks for everything since before alice: alice's (given up), carol's (never
    // sent: it was off) and bob's again.
    let (status, body) = replay(&app, &endpoint, since).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["queued"], 3, "{body}");
    app.eventually("all three orders heard", || async {
        let heard: HashSet<String> = fixed
            .accepted()
            .await
            .iter()
            .filter_map(|a| a["orderId"].as_str().map(str::to_owned))
            .collect();
        heard == HashSet::from([alice.clone(), bob.clone(), carol.clone()])
    })
    .await;
}

#[tokio::test]
async fn a_deleted_endpoint_is_gone_and_its_waiting_deliveries_end() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 10).await;
    // Its receiver never starts: the deliveries wait and are retried.
    let (endpoint, _receiver) = receiver_for(&app, &["order.confirmed"], 0.0).await;
    for i in 0..2 {
        app.buy(&format!("buyer-{i}"), "TEE", "tok_visa").await;
    }
    app.eventually("two deliveries waiting after a failed try", || async {
        let log = deliveries(&app, &endpoint).await;
        log.len() == 2 && log.iter().all(|d| d["status"] == "pending") && failed_attempts(&log) >= 2
    })
    .await;
    let path = format!("/api/admin/webhooks/{endpoint}");
    let (status, body) = app
        .request(Method::DELETE, path.clone())
        .token(&app.admin())
        .send()
        .await;
    assert!(status.is_success(), "{status} {body}");
    let (status, _) = app
        .request(Method::GET, path)
        .token(&app.admin())
        .send()
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let waiting = app
        .count(&format!(
            "SELECT count(*) FROM webhooks.deliveries
             WHERE endpoint_id = '{endpoint}' AND status = 'pending'"
        ))
        .await;
    assert_eq!(waiting, 0, "nothing is left to send to a deleted endpoint");
}

#[tokio::test]
async fn two_order_processes_send_each_message_once() {
    let app = TestApp::spawn().await;
    // A second dispatcher beside the first: an endpoint's new messages are read by one of them
    // at a time, so neither sends what the other sent.
    let _second = app.start_roles(&[checkout::app::Role::Order]).await;
    app.product("TEE", "10.00", 30).await;
    let (endpoint, mut receiver) = receiver_for(&app, &["order.confirmed"], 0.0).await;
    receiver.start().await;
    for i in 0..20 {
        app.buy(&format!("buyer-{i}"), "TEE", "tok_visa").await;
    }
    app.eventually("all twenty delivered", || async {
        let log = deliveries(&app, &endpoint).await;
        log.len() == 20 && log.iter().all(|d| d["status"] == "delivered")
    })
    .await;
    assert_eq!(unique_ids(&receiver.accepted().await).len(), 20);
}

#[tokio::test]
async fn a_message_committed_late_by_an_older_transaction_is_not_skipped() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 10).await;
    let (_, mut receiver) = receiver_for(&app, &["order.confirmed"], 0.0).await;
    receiver.start().await;
    // A transaction that begins before an order and writes its message after the order's
    // message was committed, as a slow feed step would: a cursor that passed the order's
    // message would never come back for this one.
    let mut older = app.pool.begin().await.expect("begin");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *older)
        .await
        .expect("an id taken first");
    let (token, id) = app.buy("alice", "TEE", "tok_visa").await;
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    app.eventually("the order's message written", || async {
        app.count("SELECT count(*) FROM webhooks.messages").await == 1
    })
    .await;
    // Twenty dispatcher rounds (50 ms apart in tests): not one sends the order's message
    // while a transaction older than it is open. This waiting is the point, not a sync.
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(1) {
        assert!(
            receiver.accepted().await.is_empty(),
            "the order's message was sent past an older open transaction"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let late = uuid::Uuid::new_v4();
    let body = json!({
        "type": "order.confirmed",
        "timestamp": "2026-12-05T00:00:00.000Z",
        "data": {"orderId": late},
    });
    sqlx::query(
        "INSERT INTO webhooks.messages (webhook_id, event_type, order_id, body)
         VALUES ('msg_late', 'order.confirmed', $1, $2)",
    )
    .bind(late)
    .bind(body.to_string())
    .execute(&mut *older)
    .await
    .expect("the late message");
    older.commit().await.expect("commit");
    app.eventually("both arrive", || async {
        let accepted = receiver.accepted().await;
        let orders: Vec<&str> = accepted
            .iter()
            .filter_map(|a| a["orderId"].as_str())
            .collect();
        orders.contains(&id.as_str()) && orders.contains(&late.to_string().as_str())
    })
    .await;
    assert_eq!(unique_ids(&receiver.accepted().await).len(), 2);
}
