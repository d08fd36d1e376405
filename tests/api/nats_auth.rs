//! Least privilege on NATS: every role runs as its own user (nats/auth.conf) and the saga still
//! works; a role cannot publish another step's events or delete a stream; a role bound to
//! another role's consumer is refused. And TLS with a CA of the test's own.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use checkout::app::{App, Role};
use checkout::config::{Secret, Settings};
use reqwest::StatusCode;

use crate::helpers::{test_settings, NatsServer, SandboxPsp, TestApp, TestDb};

const ROLES: [&str; 6] = [
    "edge",
    "reserve",
    "authorize",
    "order",
    "compensate",
    "operator",
];

fn password(role: &str) -> String {
    format!("{role}-password-for-this-test")
}

/// A server with nats/auth.conf's users, passwords in its environment.
fn secured_nats() -> NatsServer {
    let dir = tempfile::tempdir().expect("dir").keep();
    // Includes are relative to the including file: the test's config sits beside a copy.
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/nats/auth.conf"),
        dir.join("auth.conf"),
    )
    .expect("auth.conf");
    let conf = dir.join("server.conf");
    std::fs::write(
        &conf,
        "max_payload: 1MB\njetstream {}\ninclude ./auth.conf\n",
    )
    .expect("config");
    let env = ROLES
        .iter()
        .map(|r| {
            (
                format!("CHECKOUT_NATS_{}_PASSWORD", r.to_uppercase()),
                password(r),
            )
        })
        .collect();
    NatsServer::start_with_config(conf, env, "nats")
}

fn as_user(settings: &Settings, user: &str) -> Settings {
    let mut s = settings.clone();
    s.nats.user = user.to_owned();
    s.nats.password = Secret::new(password(user));
    s
}

async fn connect(nats: &NatsServer, user: &str) -> async_nats::jetstream::Context {
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password(user))
        .connect(nats.url())
        .await
        .expect("connects");
    let mut js = async_nats::jetstream::new(client);
    js.set_timeout(Duration::from_secs(2));
    js
}

#[tokio::test]
async fn every_role_as_its_own_user_and_nothing_more() {
    let nats = secured_nats();
    let db = TestDb::new();
    let mut settings = test_settings(&nats, &db);
    let psp = SandboxPsp::start().await;
    settings.psp.url = psp.url().to_owned();
    let front = App::build(as_user(&settings, "edge"), &[Role::Edge])
        .await
        .expect("edge starts as edge");
    let mut roles = Vec::new();
    for (role, user) in [
        (Role::Reserve, "reserve"),
        (Role::Authorize, "authorize"),
        (Role::Order, "order"),
        (Role::Compensate, "compensate"),
    ] {
        roles.push(
            App::build(as_user(&settings, user), &[role])
                .await
                .expect("role starts as its user"),
        );
    }
    let app = TestApp::attach(front, settings, psp, nats, db).await;
    app.product("TEE", "10.00", 5).await;
    let (token, id) = app.buy("alice", "TEE", "tok_visa").await;
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    let (token, declined) = app.buy("bob", "TEE", "tok_declined").await;
    assert_eq!(app.settled(&token, &declined).await["status"], "failed");
    let (status, _) = app.ship(&id).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    app.eventually("shipped", || async {
        app.order(&app.token("alice"), &id).await.1["status"] == "shipped"
    })
    .await;

    // The reserve user cannot confirm an order, nor delete a stream.
    let reserve = connect(&app.nats, "reserve").await;
    let forged = format!("checkout.confirmed.{}", uuid::Uuid::new_v4());
    let published = async {
        reserve.publish(forged.clone(), "x".into()).await?.await?;
        Ok::<_, async_nats::Error>(())
    }
    .await;
    assert!(published.is_err(), "a forged confirmation was stored");
    assert!(reserve.delete_stream("CHECKOUT").await.is_err());
    let operator = connect(&app.nats, "operator").await;
    let mut stream = operator.get_stream("CHECKOUT").await.expect("still there");
    let subjects = stream.info().await.expect("info").state.subjects_count;
    assert!(subjects > 0);
    assert!(operator
        .get_stream("CHECKOUT")
        .await
        .expect("stream")
        .get_last_raw_message_by_subject(&forged)
        .await
        .is_err());

    // The authorize user cannot bind the reserve step's durable consumer.
    let authorize = connect(&app.nats, "authorize").await;
    let stream = authorize
        .get_stream("CHECKOUT")
        .await
        .expect("may read stream info");
    let bound = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("reserve".into()),
            filter_subject: "checkout.requested.*".into(),
            ..Default::default()
        })
        .await;
    assert!(bound.is_err(), "bound another role's consumer");
    drop(roles);
}

/// A CA and a server certificate for 127.0.0.1, made with the openssl CLI.
fn certificates(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    // Each command is one line of whitespace-separated arguments, as typed in a shell.
    let run = |line: &str| {
        let args: Vec<&str> = line.split_whitespace().collect();
        let ok = Command::new("openssl")
            .args(&args)
            .current_dir(dir)
            .output()
            .expect("openssl runs")
            .status
            .success();
        assert!(ok, "openssl {line}");
    };
    run("req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=checkout-test-CA");
    run("req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1");
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("ext");
    run("x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 1 -extfile san.ext");
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

#[tokio::test]
async fn clients_connect_over_tls_to_a_server_signed_by_a_private_ca() {
    let dir = tempfile::tempdir().expect("dir").keep();
    let (ca, cert, key) = certificates(&dir);
    let conf = dir.join("tls.conf");
    std::fs::write(
        &conf,
        format!(
            "max_payload: 1MB\njetstream {{}}\ntls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n",
            cert.display(),
            key.display()
        ),
    )
    .expect("config");
    let nats = NatsServer::start_with_config(conf, Vec::new(), "tls");
    let db = TestDb::new();
    let mut settings = test_settings(&nats, &db);
    settings.nats.tls_ca_file = ca.display().to_string();
    let psp = SandboxPsp::start().await;
    settings.psp.url = psp.url().to_owned();
    let app = App::build(settings.clone(), &Role::ALL)
        .await
        .expect("starts over TLS");
    let app = TestApp::attach(app, settings, psp, nats, db).await;
    app.product("TEE", "10.00", 5).await;
    let (token, id) = app.buy("alice", "TEE", "tok_visa").await;
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    // Without the CA, the server's certificate is not trusted.
    let plain = async_nats::ConnectOptions::new()
        .connect(app.nats.url())
        .await;
    assert!(plain.is_err());
}

/// Runs `checkout run <roles>` until it exits, at most `within`: its exit status (None if it
/// was still running and was killed) and what it wrote to stderr.
fn run_to_end(
    roles: &str,
    env: Vec<(String, String)>,
    within: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_checkout"))
        .args(["run", roles])
        .envs(env)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("checkout runs");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = std::time::Instant::now() + within;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, reader.join().unwrap_or_default())
}

#[test]
fn a_bad_setting_stops_start_up_before_any_connection() {
    // Nothing listens on NATS' port: a start-up that connected first would wait forever.
    let db = TestDb::new();
    let nobody = format!("nats://127.0.0.1:{}", crate::helpers::port());
    let mut env = crate::helpers::process_env(
        &crate::helpers::test_settings_on(nobody, &db),
        crate::helpers::port(),
        "http://127.0.0.1:9",
    );
    env.push(("CHECKOUT__AUTH__JWT_SECRET".into(), "short".into()));
    let (status, stderr) = run_to_end("edge", env, Duration::from_secs(10));
    let status = status.expect("exits within seconds");
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("auth.jwt_secret"), "{stderr}");
}

#[test]
fn nats_refusing_the_user_stops_start_up_and_says_which_settings_to_fix() {
    let nats = secured_nats();
    let db = TestDb::new();
    let mut env = crate::helpers::process_env(
        &test_settings(&nats, &db),
        crate::helpers::port(),
        "http://127.0.0.1:9",
    );
    env.push(("CHECKOUT__NATS__USER".into(), "edge".into()));
    env.push(("CHECKOUT__NATS__PASSWORD".into(), "not-the-password".into()));
    let (status, stderr) = run_to_end("edge", env, Duration::from_secs(15));
    let status = status.expect("exits within seconds");
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("user `edge`"), "{stderr}");
    assert!(stderr.contains("nats.password"), "{stderr}");
    assert!(!stderr.contains("not-the-password"), "{stderr}");
}

#[tokio::test]
async fn the_edge_user_reads_timelines_but_cannot_touch_a_saga_durable() {
    let nats = secured_nats();
    let db = TestDb::new();
    let mut settings = test_settings(&nats, &db);
    let psp = SandboxPsp::start().await;
    settings.psp.url = psp.url().to_owned();
    let front = App::build(as_user(&settings, "edge"), &[Role::Edge])
        .await
        .expect("edge starts as edge");
    let reserve = App::build(as_user(&settings, "reserve"), &[Role::Reserve])
        .await
        .expect("reserve starts");
    let app = TestApp::attach(front, settings, psp, nats, db).await;
    app.product("TEE", "10.00", 5).await;
    let (token, id) = app.buy("alice", "TEE", "tok_visa").await;
    // No authorize role: the order waits after its hold, and its timeline shows that far.
    app.eventually("the timeline up to the hold", || async {
        let (status, story) = app
            .request(reqwest::Method::GET, format!("/api/orders/{id}/events"))
            .token(&token)
            .send()
            .await;
        status == StatusCode::OK && story["events"].as_array().is_some_and(|e| e.len() == 2)
    })
    .await;

    let edge = connect(&app.nats, "edge").await;
    let stream = edge
        .get_stream("CHECKOUT")
        .await
        .expect("may read stream info");
    assert!(
        stream.delete_consumer("reserve").await.is_err(),
        "the edge deleted the reserve durable"
    );
    let redefined = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("reserve".into()),
            filter_subject: format!("checkout.*.{id}"),
            ..Default::default()
        })
        .await;
    assert!(redefined.is_err(), "the edge redefined the reserve durable");
    let pulled = edge
        .request(
            "$JS.API.CONSUMER.MSG.NEXT.CHECKOUT.reserve".to_owned(),
            &serde_json::json!({"batch": 1, "expires": 500_000_000}),
        )
        .await
        .map(|_: async_nats::jetstream::response::Response<serde_json::Value>| ());
    assert!(pulled.is_err(), "the edge pulled from the reserve durable");
    // The reserve durable is as its role made it.
    let operator = connect(&app.nats, "operator").await;
    let mut durable: async_nats::jetstream::consumer::PullConsumer = operator
        .get_stream("CHECKOUT")
        .await
        .expect("stream")
        .get_consumer("reserve")
        .await
        .expect("the reserve durable still exists");
    let config = durable.info().await.expect("info").config.clone();
    let filters = [config.filter_subjects, vec![config.filter_subject]].concat();
    assert!(
        filters.contains(&"checkout.requested.>".to_owned()),
        "{filters:?}"
    );
    assert!(!filters.iter().any(|f| f.contains(&id)), "{filters:?}");
    drop(reserve);
}

/// nats/auth.conf denies the edge every durable a role binds, in every way the edge's allows
/// would otherwise reach it.
#[test]
fn the_edge_is_denied_every_durable_the_roles_bind() {
    let conf = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/nats/auth.conf"))
        .expect("auth.conf");
    let deny = conf
        .split("deny: [")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .expect("the edge's deny list");
    for durable in Role::ALL.iter().flat_map(|r| r.durables()) {
        for verb in ["CREATE", "DELETE", "MSG.NEXT"] {
            let subject = format!("\"$JS.API.CONSUMER.{verb}.CHECKOUT.{durable}\"");
            assert!(deny.contains(&subject), "{subject} is not denied");
        }
        let filtered = format!("\"$JS.API.CONSUMER.CREATE.CHECKOUT.{durable}.>\"");
        assert!(deny.contains(&filtered), "{filtered} is not denied");
    }
}

#[tokio::test]
async fn a_role_started_as_another_roles_user_stops_at_once_naming_the_denial() {
    let nats = secured_nats();
    let db = TestDb::new();
    let settings = test_settings(&nats, &db);
    // The order user may not bind the reserve durable: a configuration error, not an election.
    let started = std::time::Instant::now();
    let app = App::build(as_user(&settings, "order"), &[Role::Reserve])
        .await
        .expect("connects");
    let stopped = tokio::time::timeout(Duration::from_secs(20), app.run_until_stopped())
        .await
        .expect("stops by itself");
    let Err(e) = stopped else {
        panic!("reserve ran as the order user");
    };
    // As `checkout run` prints it: the error and its causes.
    let said = format!("{:#}", anyhow::Error::from(e));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}: {said}",
        started.elapsed()
    );
    assert!(said.contains("denied user `order`"), "{said}");
    assert!(said.contains("consumer reserve"), "{said}");
    assert!(said.contains("CHECKOUT__NATS__USER"), "{said}");
}
