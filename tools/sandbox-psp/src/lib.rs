//! The sandbox payment service provider: a small Stripe-like HTTP server used in development
//! and tests. It keeps its ledger in memory (it stands in for someone else's system).
//!
//! Card tokens:
//! - `tok_visa` approves (risk score 10); `tok_fraud` approves with risk score 92;
//! - `tok_declined` declines (`card_declined`), `tok_insufficient_funds` declines
//!   (`insufficient_funds`), any other token declines (`invalid_card`);
//! - `tok_slow` approves after about 1 s; `tok_timeout` never answers (nothing is recorded);
//! - `tok_flaky` answers 503 to the first two attempts of an idempotency key, then approves.
//!
//! Faults for tests and drills: `POST /v1/sandbox/faults` with
//! `{"status": 503, "forMs": 180000, "count": 3, "operations": ["authorize"], "afterEffect": true}`
//! makes matching calls answer `status` (for a while, or for `count` calls, or both; all
//! operations when none are named). With `afterEffect` the call is carried out first and only
//! its answer is replaced, like a timeout or a 409 that raced an approval. `DELETE` clears it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

/// How long a card authorization stays capturable.
const AUTHORIZATION_LIFETIME_DAYS: i64 = 7;

/// An injected fault: matching calls answer `status`.
#[derive(Clone, Debug)]
struct Fault {
    status: StatusCode,
    until: Option<std::time::Instant>,
    remaining: Option<u32>,
    operations: Vec<String>,
    after_effect: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FaultBody {
    status: u16,
    #[serde(default)]
    for_ms: Option<u64>,
    #[serde(default)]
    count: Option<u32>,
    #[serde(default)]
    operations: Vec<String>,
    #[serde(default)]
    after_effect: bool,
}

#[derive(Default)]
struct Ledger {
    fault: Option<Fault>,
    /// `(operation path, Idempotency-Key)` -> (request fingerprint, status, reply).
    replies: HashMap<(String, String), (String, StatusCode, Value)>,
    authorizations: HashMap<String, Authorization>,
    entries: Vec<LedgerEntry>,
    /// Attempts per idempotency key, for `tok_flaky`.
    attempts: HashMap<String, u32>,
}

#[derive(Clone)]
struct Authorization {
    amount: Decimal,
    captured: Decimal,
    status: &'static str,
    expires_at: DateTime<Utc>,
}

#[derive(Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct LedgerEntry {
    kind: &'static str,
    id: String,
    authorization_id: String,
    reference: String,
    amount: String,
    currency: String,
    status: String,
    at: DateTime<Utc>,
    /// The W3C `traceparent` the call carried, as a provider's request log keeps it.
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
}

/// Shared state of the sandbox.
#[derive(Clone, Default)]
pub struct Sandbox {
    ledger: Arc<Mutex<Ledger>>,
}

#[derive(Deserialize, Serialize)]
struct AuthorizeBody {
    amount: String,
    currency: String,
    token: String,
    reference: String,
}

#[derive(Deserialize, Serialize, Default)]
struct AmountBody {
    #[serde(default)]
    amount: Option<String>,
}

#[derive(Deserialize)]
struct LedgerQuery {
    reference: Option<String>,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

fn key_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get("Idempotency-Key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .map(str::to_owned)
}

impl Sandbox {
    /// Serves the sandbox on `listener` until the task running this is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }

    /// The sandbox's routes.
    pub fn router(self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/v1/authorizations", post(authorize))
            .route("/v1/authorizations/{id}/{operation}", post(operate))
            .route("/v1/ledger", get(ledger))
            .route("/v1/authorizations", get(authorizations))
            .route("/v1/sandbox/faults", post(set_fault).delete(clear_fault))
            .with_state(self)
            .layer(axum::middleware::from_fn(continue_trace))
    }

    /// The fault that applies to this call now, if any (and counts it).
    fn fault_for(&self, operation: &str) -> Option<Fault> {
        let mut ledger = self.ledger.lock().ok()?;
        let fault = ledger.fault.as_mut()?;
        let expired = fault.until.is_some_and(|t| std::time::Instant::now() >= t)
            || fault.remaining == Some(0);
        if expired {
            ledger.fault = None;
            return None;
        }
        if !fault.operations.is_empty() && !fault.operations.iter().any(|o| o == operation) {
            return None;
        }
        if let Some(n) = fault.remaining.as_mut() {
            *n -= 1;
        }
        Some(fault.clone())
    }

    /// Runs `f` at most once per (operation, key); replays its reply afterwards.
    fn idempotent(
        &self,
        operation: &str,
        key: String,
        fingerprint: String,
        f: impl FnOnce(&mut Ledger) -> (StatusCode, Value),
    ) -> Response {
        let Ok(mut ledger) = self.ledger.lock() else {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "ledger poisoned",
            );
        };
        let slot = (operation.to_owned(), key);
        if let Some((stored, status, reply)) = ledger.replies.get(&slot) {
            if *stored != fingerprint {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    "this key was used with other parameters",
                );
            }
            return (*status, Json(reply.clone())).into_response();
        }
        let (status, reply) = f(&mut ledger);
        // Like Stripe, only answers that reached the ledger logic are remembered.
        ledger
            .replies
            .insert(slot, (fingerprint, status, reply.clone()));
        (status, Json(reply)).into_response()
    }
}

/// Like a real provider, the sandbox finishes what it started even when the client gave up
/// waiting (a timeout on our side is not a cancellation on theirs).
async fn detached(work: impl std::future::Future<Output = Response> + Send + 'static) -> Response {
    tokio::spawn(work).await.unwrap_or_else(|_| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "handler failed",
        )
    })
}

/// Each request is a span that names the caller's trace (its W3C `traceparent` header), as a
/// provider's request log would.
async fn continue_trace(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "psp_request",
        method = %request.method(),
        path = %request.uri().path(),
        traceparent = traceparent_of(request.headers()).unwrap_or_default(),
    );
    next.run(request).instrument(span).await
}

fn traceparent_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn authorize(
    State(sandbox): State<Sandbox>,
    headers: HeaderMap,
    body: Option<Json<AuthorizeBody>>,
) -> Response {
    detached(authorize_detached(sandbox, headers, body)).await
}

async fn authorize_detached(
    sandbox: Sandbox,
    headers: HeaderMap,
    body: Option<Json<AuthorizeBody>>,
) -> Response {
    let Some(key) = key_of(&headers) else {
        return error(
            StatusCode::BAD_REQUEST,
            "idempotency_key_required",
            "send an Idempotency-Key",
        );
    };
    let Some(Json(body)) = body else {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "malformed body");
    };
    let Ok(amount) = body.amount.parse::<Decimal>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_amount",
            "amount must be a decimal string",
        );
    };
    match body.token.as_str() {
        // Hangs past any sane client timeout; the client gives up, nothing is authorized.
        "tok_timeout" => {
            tokio::time::sleep(std::time::Duration::from_secs(120)).await;
            return error(StatusCode::GATEWAY_TIMEOUT, "timeout", "no answer");
        }
        "tok_slow" => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
        "tok_flaky" => {
            let Ok(mut ledger) = sandbox.ledger.lock() else {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "ledger poisoned",
                );
            };
            let answered = ledger
                .replies
                .contains_key(&("authorize".to_owned(), key.clone()));
            let attempts = ledger.attempts.entry(key.clone()).or_insert(0);
            *attempts += 1;
            if !answered && *attempts <= 2 {
                return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "try again");
            }
        }
        _ => {}
    }
    let fault = sandbox.fault_for("authorize");
    if let Some(f) = fault.as_ref().filter(|f| !f.after_effect) {
        return error(f.status, "injected_fault", "sandbox fault");
    }
    let fingerprint = serde_json::to_string(&body).unwrap_or_default();
    let traceparent = traceparent_of(&headers);
    let response = sandbox.idempotent("authorize", key, fingerprint, move |ledger| {
        let id = format!("auth_{}", Uuid::new_v4().simple());
        let now = Utc::now();
        let (status, decline_code, risk_score) = match body.token.as_str() {
            "tok_visa" | "tok_slow" | "tok_flaky" => ("authorized", None, 10),
            "tok_fraud" => ("authorized", None, 92),
            "tok_declined" => ("declined", Some("card_declined"), 10),
            "tok_insufficient_funds" => ("declined", Some("insufficient_funds"), 10),
            _ => ("declined", Some("invalid_card"), 10),
        };
        let expires_at = now + Duration::days(AUTHORIZATION_LIFETIME_DAYS);
        if status == "authorized" {
            ledger.authorizations.insert(
                id.clone(),
                Authorization {
                    amount,
                    captured: Decimal::ZERO,
                    status: "authorized",
                    expires_at,
                },
            );
        }
        ledger.entries.push(LedgerEntry {
            kind: "authorization",
            id: id.clone(),
            authorization_id: id.clone(),
            reference: body.reference.clone(),
            amount: body.amount.clone(),
            currency: body.currency.clone(),
            status: status.to_owned(),
            at: now,
            traceparent,
        });
        (
            StatusCode::OK,
            json!({
                "id": id,
                "status": status,
                "declineCode": decline_code,
                "amount": body.amount,
                "currency": body.currency,
                "reference": body.reference,
                "riskScore": risk_score,
                "expiresAt": (status == "authorized").then_some(expires_at),
            }),
        )
    });
    match fault {
        Some(f) => error(
            f.status,
            "injected_fault",
            "sandbox fault (after the effect)",
        ),
        None => response,
    }
}

async fn operate(
    State(sandbox): State<Sandbox>,
    Path((id, operation)): Path<(String, String)>,
    headers: HeaderMap,
    body: Option<Json<AmountBody>>,
) -> Response {
    let Some(key) = key_of(&headers) else {
        return error(
            StatusCode::BAD_REQUEST,
            "idempotency_key_required",
            "send an Idempotency-Key",
        );
    };
    let (kind, from, to): (&'static str, &str, &'static str) = match operation.as_str() {
        "capture" => ("capture", "authorized", "captured"),
        "void" => ("void", "authorized", "voided"),
        "refund" => ("refund", "captured", "refunded"),
        _ => return error(StatusCode::NOT_FOUND, "not_found", "unknown operation"),
    };
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let requested = match body.amount.as_deref().map(str::parse::<Decimal>) {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_amount",
                "amount must be a decimal string",
            )
        }
    };
    let fault = sandbox.fault_for(kind);
    if let Some(f) = fault.as_ref().filter(|f| !f.after_effect) {
        return error(f.status, "injected_fault", "sandbox fault");
    }
    let fingerprint = format!("{id}|{:?}", body.amount);
    let response = sandbox.idempotent(kind, key, fingerprint, move |ledger| {
        let Some(auth) = ledger.authorizations.get(&id).cloned() else {
            return (StatusCode::NOT_FOUND, json!({"error": {"code": "not_found", "message": "no such authorization"}}));
        };
        if kind == "capture" && auth.expires_at <= Utc::now() {
            return (
                StatusCode::BAD_REQUEST,
                json!({"error": {"code": "authorization_expired", "message": "the authorization has expired"}}),
            );
        }
        if auth.status != from {
            return (
                StatusCode::BAD_REQUEST,
                json!({"error": {"code": "invalid_state", "message": format!("authorization is {}", auth.status)}}),
            );
        }
        let amount = match kind {
            "capture" => requested.unwrap_or(auth.amount).min(auth.amount),
            "refund" => requested.unwrap_or(auth.captured).min(auth.captured),
            _ => auth.amount,
        };
        let reference = ledger
            .entries
            .iter()
            .find(|e| e.id == id)
            .map(|e| (e.reference.clone(), e.currency.clone()))
            .unwrap_or_default();
        if let Some(a) = ledger.authorizations.get_mut(&id) {
            a.status = to;
            if kind == "capture" {
                a.captured = amount;
            }
        }
        let entry_id = format!("{kind}_{}", Uuid::new_v4().simple());
        ledger.entries.push(LedgerEntry {
            kind,
            id: entry_id.clone(),
            authorization_id: id.clone(),
            reference: reference.0,
            amount: amount.to_string(),
            currency: reference.1,
            status: to.to_owned(),
            at: Utc::now(),
            traceparent: None,
        });
        (StatusCode::OK, json!({"id": entry_id, "authorizationId": id, "status": to, "amount": amount.to_string()}))
    });
    match fault {
        Some(f) => error(
            f.status,
            "injected_fault",
            "sandbox fault (after the effect)",
        ),
        None => response,
    }
}

async fn set_fault(State(sandbox): State<Sandbox>, Json(body): Json<FaultBody>) -> Response {
    let Ok(status) = StatusCode::from_u16(body.status) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_status",
            "not an HTTP status",
        );
    };
    let fault = Fault {
        status,
        until: body
            .for_ms
            .map(|ms| std::time::Instant::now() + std::time::Duration::from_millis(ms)),
        remaining: body.count,
        operations: body.operations,
        after_effect: body.after_effect,
    };
    match sandbox.ledger.lock() {
        Ok(mut ledger) => {
            ledger.fault = Some(fault);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "ledger poisoned",
        ),
    }
}

async fn clear_fault(State(sandbox): State<Sandbox>) -> Response {
    match sandbox.ledger.lock() {
        Ok(mut ledger) => {
            ledger.fault = None;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "ledger poisoned",
        ),
    }
}

async fn ledger(State(sandbox): State<Sandbox>, Query(query): Query<LedgerQuery>) -> Response {
    let Ok(ledger) = sandbox.ledger.lock() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "ledger poisoned",
        );
    };
    let entries: Vec<&LedgerEntry> = ledger
        .entries
        .iter()
        .filter(|e| query.reference.as_deref().is_none_or(|r| r == e.reference))
        .collect();
    Json(json!({ "entries": entries })).into_response()
}

/// Authorizations of one reference with their current status (for reconciliation).
async fn authorizations(
    State(sandbox): State<Sandbox>,
    Query(query): Query<LedgerQuery>,
) -> Response {
    let Ok(ledger) = sandbox.ledger.lock() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "ledger poisoned",
        );
    };
    let mut counts: HashMap<(&str, &str), usize> = HashMap::new();
    for x in &ledger.entries {
        *counts
            .entry((x.kind, x.authorization_id.as_str()))
            .or_default() += 1;
    }
    let found: Vec<Value> = ledger
        .entries
        .iter()
        .filter(|e| e.kind == "authorization")
        .filter(|e| query.reference.as_deref().is_none_or(|r| r == e.reference))
        .map(|e| {
            let auth = ledger.authorizations.get(&e.id);
            let status = auth.map_or(e.status.as_str(), |a| a.status);
            let count = |kind: &str| counts.get(&(kind, e.id.as_str())).copied().unwrap_or(0);
            json!({"id": e.id, "status": status, "amount": e.amount, "currency": e.currency,
                   "reference": e.reference, "expiresAt": auth.map(|a| a.expires_at),
                   "captures": count("capture"), "refunds": count("refund")})
        })
        .collect();
    Json(json!({ "authorizations": found })).into_response()
}
