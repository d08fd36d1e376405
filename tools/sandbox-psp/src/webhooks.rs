//! Webhooks, Stripe's scheme: signed events posted to one endpoint, retried with backoff, all
//! kept so tests can read them and deliver them again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;
use uuid::Uuid;

use crate::{error, Sandbox};

/// The header that carries an event's signature.
pub const SIGNATURE_HEADER: &str = "Psp-Signature";

/// Attempts of a delivery before the sandbox gives up on an event.
const MAX_ATTEMPTS: u32 = 12;
/// The wait before the first retry; it doubles, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

type HmacSha256 = Hmac<Sha256>;

/// The `Psp-Signature` header of `body` sent at `timestamp` (unix seconds):
/// `t=<timestamp>,v1=<lowercase hex of HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub fn signature_header(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mac = mac_of(secret, timestamp, body).map(|m| hex::encode(m.finalize().into_bytes()));
    format!("t={timestamp},v1={}", mac.unwrap_or_default())
}

/// Whether `header` (a `Psp-Signature` value) signs `body` with `secret`. It checks the
/// signature only (in constant time); how old `t=` may be is the receiver's call.
pub fn verify_signature(secret: &str, header: &str, body: &[u8]) -> bool {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", v1)) => signatures.extend(hex::decode(v1).ok()),
            _ => {}
        }
    }
    let Some(timestamp) = timestamp else {
        return false;
    };
    signatures.iter().any(|signature| {
        mac_of(secret, timestamp, body).is_some_and(|mac| mac.verify_slice(signature).is_ok())
    })
}

fn mac_of(secret: &str, timestamp: i64, body: &[u8]) -> Option<HmacSha256> {
    // HMAC takes keys of any length: this never fails.
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).ok()?;
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(mac)
}

/// The webhooks: the endpoint and every event so far.
#[derive(Clone)]
pub(crate) struct Webhooks {
    state: Arc<Mutex<Registry>>,
    client: reqwest::Client,
}

impl Default for Webhooks {
    fn default() -> Self {
        // Endpoints are local services: no proxy from the environment in between.
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(ATTEMPT_TIMEOUT)
            .build()
            .unwrap_or_default();
        Self {
            state: Arc::default(),
            client,
        }
    }
}

#[derive(Default)]
struct Registry {
    endpoint: Option<Endpoint>,
    events: Vec<Event>,
}

#[derive(Clone)]
struct Endpoint {
    url: String,
    secret: String,
}

struct Event {
    id: String,
    kind: &'static str,
    body: Value,
    /// The bytes sent, the same at every attempt.
    raw: String,
    attempts: u32,
    last_status: Option<u16>,
    delivered: bool,
}

/// What an event says about an authorization.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EventData {
    pub(crate) authorization_id: String,
    pub(crate) reference: String,
    pub(crate) amount: String,
    pub(crate) currency: String,
    pub(crate) status: &'static str,
    pub(crate) decline_code: Option<&'static str>,
}

#[derive(Serialize)]
struct EventBody<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    created: i64,
    data: &'a EventData,
}

/// What one attempt came to.
enum Attempt {
    /// Nothing was sent: no endpoint, no such event, or (for the retries) delivered already.
    Skipped,
    /// Sent; the endpoint's status, `None` when it gave none (refused, timed out).
    Sent(Option<u16>),
}

impl Webhooks {
    pub(crate) fn set_endpoint(&self, url: String, secret: String) {
        if let Ok(mut state) = self.state.lock() {
            state.endpoint = Some(Endpoint { url, secret });
        }
    }

    /// Records an event and, when there is an endpoint, starts its delivery.
    pub(crate) fn emit(&self, kind: &'static str, data: &EventData) {
        let id = format!("evt_{}", Uuid::new_v4().simple());
        let body = EventBody {
            id: &id,
            kind,
            created: Utc::now().timestamp(),
            data,
        };
        let raw = serde_json::to_string(&body).unwrap_or_default();
        let body = serde_json::to_value(&body).unwrap_or_default();
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.events.push(Event {
            id: id.clone(),
            kind,
            body,
            raw,
            attempts: 0,
            last_status: None,
            delivered: false,
        });
        if state.endpoint.is_some() {
            tokio::spawn(self.clone().deliver(id));
        } else {
            tracing::info!(
                event = id,
                kind,
                "no webhook endpoint: event kept, not sent"
            );
        }
    }

    /// Sends the event until the endpoint takes it (a 2xx) or the attempts run out.
    async fn deliver(self, id: String) {
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=MAX_ATTEMPTS {
            match self.attempt(&id, false).await {
                Attempt::Skipped => return,
                Attempt::Sent(Some(status)) if (200..300).contains(&status) => return,
                Attempt::Sent(status) => {
                    tracing::info!(event = id, attempt, ?status, "webhook not taken");
                }
            }
            if attempt < MAX_ATTEMPTS {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        tracing::warn!(event = id, "webhook given up after {MAX_ATTEMPTS} attempts");
    }

    /// Posts the event once, signed now, and records what came of it.
    async fn attempt(&self, id: &str, even_if_delivered: bool) -> Attempt {
        let found = self.state.lock().ok().and_then(|state| {
            let event = state.events.iter().find(|e| e.id == id)?;
            let endpoint = state.endpoint.clone()?;
            (even_if_delivered || !event.delivered).then(|| (endpoint, event.raw.clone()))
        });
        let Some((endpoint, raw)) = found else {
            return Attempt::Skipped;
        };
        let signature = signature_header(&endpoint.secret, Utc::now().timestamp(), raw.as_bytes());
        let status = self
            .client
            .post(&endpoint.url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .timeout(ATTEMPT_TIMEOUT)
            .body(raw)
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16());
        if let Ok(mut state) = self.state.lock() {
            if let Some(event) = state.events.iter_mut().find(|e| e.id == id) {
                event.attempts += 1;
                event.last_status = status;
                event.delivered |= status.is_some_and(|s| (200..300).contains(&s));
            }
        }
        Attempt::Sent(status)
    }
}

#[derive(Deserialize)]
pub(crate) struct EndpointBody {
    url: String,
    secret: String,
}

/// `POST /v1/sandbox/webhook-endpoint`: where the webhooks go from now on.
pub(crate) async fn set_endpoint(
    State(sandbox): State<Sandbox>,
    Json(body): Json<EndpointBody>,
) -> Response {
    if reqwest::Url::parse(&body.url).is_err() {
        return error(StatusCode::BAD_REQUEST, "invalid_url", "url is not a URL");
    }
    sandbox.webhooks.set_endpoint(body.url.clone(), body.secret);
    Json(json!({"url": body.url})).into_response()
}

pub(crate) async fn clear_endpoint(State(sandbox): State<Sandbox>) -> Response {
    if let Ok(mut state) = sandbox.webhooks.state.lock() {
        state.endpoint = None;
    }
    StatusCode::NO_CONTENT.into_response()
}

/// `GET /v1/sandbox/webhooks`: every event, delivered or not.
pub(crate) async fn list(State(sandbox): State<Sandbox>) -> Response {
    let Ok(state) = sandbox.webhooks.state.lock() else {
        return crate::poisoned();
    };
    let events: Vec<Value> = state
        .events
        .iter()
        .map(|e| {
            json!({"id": e.id, "type": e.kind, "body": e.body, "attempts": e.attempts,
                   "lastStatus": e.last_status, "delivered": e.delivered})
        })
        .collect();
    Json(json!({ "events": events })).into_response()
}

/// `POST /v1/sandbox/webhooks/{id}/resend`: the same event once more, now.
pub(crate) async fn resend(State(sandbox): State<Sandbox>, Path(id): Path<String>) -> Response {
    let known = sandbox
        .webhooks
        .state
        .lock()
        .is_ok_and(|state| state.events.iter().any(|e| e.id == id));
    if !known {
        return error(StatusCode::NOT_FOUND, "not_found", "no such event");
    }
    let status = match sandbox.webhooks.attempt(&id, true).await {
        Attempt::Sent(status) => status,
        Attempt::Skipped => None,
    };
    Json(json!({ "status": status })).into_response()
}
