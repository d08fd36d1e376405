//! Safe defaults: weak token secrets refused at start-up, every kind of bad token refused,
//! asymmetric tokens from an identity provider accepted through a JWKS file.

use std::time::{SystemTime, UNIX_EPOCH};

use checkout::app::{App, Role};
use checkout::config::Secret;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{test_settings, NatsServer, TestApp, TestDb};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hs256(secret: &str, claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token")
}

fn es256(kid: &str, claims: Value) -> String {
    let pem = include_bytes!("../fixtures/es256-private.pem");
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    encode(
        &header,
        &claims,
        &EncodingKey::from_ec_pem(pem).expect("test key"),
    )
    .expect("token")
}

async fn cart_status(app: &TestApp, token: &str) -> StatusCode {
    app.cart(token).await.0
}

#[tokio::test]
async fn the_edge_refuses_to_start_with_a_weak_or_default_secret() {
    let nats = NatsServer::start();
    let db = TestDb::new();
    for (secret, says) in [
        ("dev-only-secret-change-me", "development secret"),
        ("too-short", "at least 32"),
    ] {
        let mut settings = test_settings(&nats, &db);
        settings.auth.jwt_secret = Secret::new(secret);
        let refused = App::build(settings, &[Role::Edge]).await;
        let error = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains(says), "{error}");
        assert!(error.contains("CHECKOUT__AUTH__JWT_SECRET"), "{error}");
    }
}

#[tokio::test]
async fn every_kind_of_bad_token_is_refused() {
    let app = TestApp::spawn_with(|s| {
        s.auth.issuer = "https://id.example".into();
        s.auth.audience = "checkout".into();
    })
    .await;
    let secret = app.settings.auth.jwt_secret.expose().to_owned();
    let good =
        json!({"sub": "alice", "exp": now() + 600, "iss": "https://id.example", "aud": "checkout"});
    assert_eq!(
        cart_status(&app, &hs256(&secret, good.clone())).await,
        StatusCode::OK
    );
    let unsigned = {
        // alg "none": a header and claims with an empty signature.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(good.to_string())
        )
    };
    let mut expired = good.clone();
    expired["exp"] = json!(now() - 3600);
    let mut no_sub = good.clone();
    no_sub.as_object_mut().map(|o| o.remove("sub"));
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = json!("https://evil.example");
    for (what, token) in [
        ("alg none", unsigned),
        ("wrong key", hs256(&"k".repeat(40), good.clone())),
        ("expired", hs256(&secret, expired)),
        ("missing sub", hs256(&secret, no_sub)),
        ("wrong aud", hs256(&secret, wrong_aud)),
        ("wrong iss", hs256(&secret, wrong_iss)),
        ("unknown ES256 key", es256("test-es256", good.clone())),
    ] {
        let (status, body) = app.cart(&token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized", "{what}");
    }
}

#[tokio::test]
async fn tokens_signed_by_an_identity_provider_are_accepted_through_jwks() {
    let jwks = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwks.json");
    let app = TestApp::spawn_with(|s| s.auth.jwks_file = jwks.into()).await;
    let claims = json!({"sub": "carol", "exp": now() + 600, "roles": ["admin"]});
    let token = es256("test-es256", claims.clone());
    assert_eq!(cart_status(&app, &token).await, StatusCode::OK);
    let (status, _) = app
        .request(Method::GET, "/api/admin/stock/NOPE")
        .token(&token)
        .send()
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the admin role is honoured");
    // A kid the JWKS does not hold is refused.
    let stranger = es256("someone-else", claims);
    assert_eq!(cart_status(&app, &stranger).await, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn one_users_burst_is_limited_with_retry_after_and_others_are_not() {
    let app = TestApp::spawn_with(|s| {
        s.edge.requests_per_user_per_s = 1;
        s.edge.requests_per_user_burst = 3;
        s.edge.checkouts_per_user_per_min = 1;
        s.edge.checkouts_per_user_burst = 1;
    })
    .await;
    let alice = app.token("alice");
    let (mut admitted, mut limited) = (0, 0);
    for _ in 0..6 {
        let response = app
            .http
            .get(format!("{}/api/cart", app.base))
            .bearer_auth(&alice)
            .send()
            .await
            .expect("answer");
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            assert!(after.is_some_and(|s| s >= 1), "{after:?}");
            let body: Value = response.json().await.expect("json");
            assert_eq!(body["error"]["code"], "rate_limited");
            limited += 1;
        } else {
            assert_eq!(response.status(), StatusCode::OK);
            admitted += 1;
        }
    }
    assert!(
        (3..=4).contains(&admitted) && limited >= 2,
        "{admitted} admitted, {limited} limited"
    );
    // Another user is not affected.
    assert_eq!(cart_status(&app, &app.token("bob")).await, StatusCode::OK);

    // Checkouts have their own, stricter bucket: one a minute here.
    app.product("TEE", "1.00", 10).await;
    let carol = app.token("carol");
    let cart = app.add(&carol, "TEE", 1).await;
    let (status, _) = app.checkout(&carol, "k1", &cart, "tok_visa").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, body) = app.checkout(&carol, "k2", &cart, "tok_visa").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
}

/// The payment token reaches the authorize step, sealed, and nothing after it: later events
/// and the stored checkout never hold it, and no stored copy holds it in clear. No event
/// carries the address; the order shows it.
#[tokio::test]
async fn the_payment_token_travels_only_as_far_as_the_authorize_step() {
    use checkout::saga::events::Event;

    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 10).await;
    let (token, paid) = app.buy("ada", "TEE", "tok_visa").await;
    assert_eq!(app.settled(&token, &paid).await["status"], "confirmed");
    let (status, body) = app.ship(&paid).await;
    assert!(status.is_success(), "{body}");
    let (status, order) = app.order(&token, &paid).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(order["shipTo"]["city"], "London", "{order}");
    let (token, declined) = app.buy("bob", "TEE", "tok_declined").await;
    assert_eq!(app.settled(&token, &declined).await["status"], "failed");
    app.eventually("the shipment captured", || async {
        app.order(&app.token("ada"), &paid).await.1["status"] == "shipped"
    })
    .await;

    let js = app.jetstream().await;
    let stream = js.get_stream("CHECKOUT").await.expect("stream");
    let last = stream.get_info().await.expect("info").state.last_sequence;
    let (mut carrying, mut clean, mut sealed_only) = (Vec::new(), Vec::new(), true);
    for seq in 1..=last {
        let message = stream.get_raw_message(seq).await.expect("message");
        let event = Event::decode(&message.payload).expect("a saga event");
        let kind = event.kind().as_str().to_owned();
        assert!(
            event.checkout().address.is_none(),
            "{kind} carries the address"
        );
        let travelling = &event.checkout().payment_token;
        if travelling.is_empty() {
            clean.push(kind);
        } else {
            sealed_only &= travelling.starts_with("sealed1.") && !travelling.contains("tok_");
            carrying.push(kind);
        }
    }
    carrying.sort();
    carrying.dedup();
    assert_eq!(carrying, ["requested", "reserved"], "clean: {clean:?}");
    assert!(sealed_only, "a token travelled unsealed");
    for kind in ["authorized", "declined", "confirmed", "failed", "shipped"] {
        assert!(clean.iter().any(|k| k == kind), "{kind} in {clean:?}");
    }
    // Sealed in flight, so no stored copy holds the token in clear either.
    for (table, column) in [
        ("edge.checkouts", "event"),
        ("edge.outbox", "payload"),
        ("inventory.inbox", "outputs"),
        ("payments.inbox", "outputs"),
        ("orders.inbox", "outputs"),
    ] {
        let holding = app
            .count(&format!(
                "SELECT count(*) FROM {table} WHERE position('tok_'::bytea IN {column}) > 0"
            ))
            .await;
        assert_eq!(holding, 0, "{table} holds a payment token");
    }
}
