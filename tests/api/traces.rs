//! Traces: one checkout is one trace across every process (edge, each saga step, the PSP),
//! exported with OTLP to a receiver in the test and decoded with the OTLP protobuf types.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

use crate::helpers::{
    eventually, port, process_env, test_settings, wait_ready, CheckoutProcess, NatsServer,
    SandboxPsp, TestApp, TestDb,
};

#[derive(Debug, Clone)]
struct Exported {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    service: String,
}

type Spans = Arc<Mutex<Vec<Exported>>>;

async fn collect(State(spans): State<Spans>, body: Bytes) -> &'static str {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return "";
    };
    let mut got = Vec::new();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| match &v.value {
                Some(AnyValue::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                got.push(Exported {
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent: hex::encode(&span.parent_span_id),
                    name: span.name,
                    service: service.clone(),
                });
            }
        }
    }
    if let Ok(mut spans) = spans.lock() {
        spans.extend(got);
    }
    ""
}

/// An OTLP/HTTP receiver on a free port; the spans it received.
async fn receiver() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let app = Router::new()
        .route("/v1/traces", post(collect))
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), spans)
}

#[tokio::test]
async fn one_checkout_is_one_trace_across_every_process() {
    let (endpoint, spans) = receiver().await;
    let nats = NatsServer::start();
    let db = TestDb::new();
    let mut settings = test_settings(&nats, &db);
    let http_port = port();
    // The provider is someone else's system: it does not export to our collector, but its
    // request log shows the trace context each call carried.
    let psp = SandboxPsp::start().await;
    settings.psp.url = psp.url().to_owned();
    let mut env = process_env(&settings, http_port, psp.url());
    env.extend([
        ("CHECKOUT__TELEMETRY__OTLP_ENDPOINT".to_owned(), endpoint),
        // Export quickly: the test waits for the spans.
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
    ]);
    // Every role its own process, as in production.
    let base = format!("http://127.0.0.1:{http_port}");
    let mut processes = vec![CheckoutProcess::start("edge", env.clone())];
    wait_ready(&reqwest::Client::new(), &base).await;
    for role in ["reserve", "authorize", "order", "compensate"] {
        processes.push(CheckoutProcess::start(role, env.clone()));
    }
    let app = TestApp::remote(base, settings, psp, nats, db).await;
    app.product("TEE", "10.00", 5).await;
    let (token, id) = app.buy("alice", "TEE", "tok_visa").await;
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    let (traceparent,): (String,) =
        sqlx::query_as("SELECT traceparent FROM edge.checkouts WHERE order_id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.pool)
            .await
            .expect("the checkout's trace");
    let trace_id = traceparent.split('-').nth(1).expect("trace id").to_owned();
    let of_trace = || -> Vec<Exported> {
        spans
            .lock()
            .map(|s| {
                s.iter()
                    .filter(|x| x.trace_id == trace_id)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    };
    let wanted: HashSet<&str> = ["edge", "reserve", "authorize", "order"].into();
    // Each process exports in batches on its own schedule: wait until every process's spans
    // and every span's parent have arrived (the assertions below then say what is wrong).
    eventually(
        "spans from every process, each with its parent",
        Duration::from_secs(20),
        || async {
            let trace = of_trace();
            let services: HashSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
            let ids: HashSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
            wanted.iter().all(|w| services.contains(*w))
                && trace
                    .iter()
                    .all(|s| s.parent.is_empty() || ids.contains(s.parent.as_str()))
        },
    )
    .await;
    let trace = of_trace();
    // One tree: a single root (the edge's request), every other span's parent in the trace.
    let ids: HashSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<&Exported> = trace.iter().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(roots.len(), 1, "one root: {trace:#?}");
    assert_eq!(roots[0].service, "edge");
    for span in &trace {
        assert!(
            span.parent.is_empty() || ids.contains(span.parent.as_str()),
            "{} of {} has a parent outside the trace: {trace:#?}",
            span.name,
            span.service
        );
    }
    let names: HashMap<&str, usize> = trace.iter().fold(HashMap::new(), |mut m, s| {
        *m.entry(s.name.as_str()).or_default() += 1;
        m
    });
    // One per step the checkout passed: reserve, authorize, order.
    assert!(
        names.get("saga_step").copied().unwrap_or(0) >= 3,
        "{names:?}"
    );
    // The provider's call carries the trace on: its parent is our psp_call span.
    let psp_call = trace
        .iter()
        .find(|s| s.name == "psp_call")
        .unwrap_or_else(|| panic!("a psp_call span: {names:?}"));
    let ledger: serde_json::Value = app
        .http
        .get(format!("{}/v1/ledger?reference={id}", app.psp))
        .send()
        .await
        .expect("the provider's ledger")
        .json()
        .await
        .expect("json");
    let carried = ledger["entries"][0]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("the provider saw no traceparent: {ledger}"));
    assert_eq!(
        carried,
        format!("00-{trace_id}-{}-01", psp_call.span_id),
        "{ledger}"
    );
    drop(processes);
}
