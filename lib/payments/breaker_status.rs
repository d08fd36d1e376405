//! Live status shared across processes through a JetStream key-value bucket: each authorize
//! process reports its circuit breaker, and the edge's `/readyz` shows them all.

use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::payments::guard::CircuitBreaker;

/// The bucket; entries vanish a minute after their process stops reporting.
const BUCKET: &str = "checkout_status";

async fn bucket(bus: &Bus) -> Option<kv::Store> {
    let js = bus.jetstream();
    if let Ok(store) = js.get_key_value(BUCKET).await {
        return Some(store);
    }
    js.create_key_value(kv::Config {
        bucket: BUCKET.into(),
        history: 1,
        max_age: Duration::from_secs(60),
        // Replicated like the streams, so /readyz's view survives the loss of one node.
        num_replicas: bus.settings().replicas,
        ..Default::default()
    })
    .await
    .ok()
}

/// Publishes this process's breaker state every 5 s and on every change, until shutdown.
pub async fn report_breaker(
    bus: Bus,
    breaker: std::sync::Arc<CircuitBreaker>,
    shutdown: CancellationToken,
) {
    let instance = format!(
        "{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into()),
        std::process::id()
    )
    .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_");
    let key = format!("breaker.{instance}");
    let mut last = None;
    let mut since_report = Duration::MAX;
    let tick = Duration::from_millis(250);
    loop {
        let state = breaker.state();
        crate::metrics::breaker(state.gauge());
        if last != Some(state) || since_report >= Duration::from_secs(5) {
            if let Some(store) = bucket(&bus).await {
                let body = json!({"state": state, "at": chrono::Utc::now()}).to_string();
                if store.put(&key, body.into()).await.is_ok() {
                    last = Some(state);
                    since_report = Duration::ZERO;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => since_report = since_report.saturating_add(tick),
        }
    }
}

/// How many authorize processes' breakers are in each state (no instance names: readiness
/// must not reveal hosts or processes).
pub async fn breaker_counts(bus: &Bus) -> Value {
    let mut counts = serde_json::Map::new();
    for state in ["closed", "half_open", "open"] {
        counts.insert(state.to_owned(), json!(0));
    }
    if let Value::Object(by_instance) = breakers(bus).await {
        for report in by_instance.values() {
            if let Some(state) = report["state"].as_str() {
                if let Some(n) = counts.get_mut(state) {
                    *n = json!(n.as_u64().unwrap_or(0) + 1);
                }
            }
        }
    }
    Value::Object(counts)
}

/// Every authorize process's breaker, by instance.
pub async fn breakers(bus: &Bus) -> Value {
    let Ok(store) = bus.jetstream().get_key_value(BUCKET).await else {
        return json!({});
    };
    let mut out = serde_json::Map::new();
    let Ok(mut keys) = store.keys().await else {
        return json!({});
    };
    while let Some(Ok(key)) = keys.next().await {
        if let Some(instance) = key.strip_prefix("breaker.") {
            if let Ok(Some(value)) = store.get(&key).await {
                let parsed: Value = serde_json::from_slice(&value).unwrap_or(Value::Null);
                out.insert(instance.to_owned(), parsed);
            }
        }
    }
    Value::Object(out)
}
