//! The sandbox payment service provider: a small Stripe-like HTTP server used in development
//! and tests. It keeps its ledger in memory (it stands in for someone else's system).
//!
//! Card tokens:
//! - `tok_visa` approves (risk score 10); `tok_fraud` approves with risk score 92;
//! - `tok_declined` declines (`card_declined`), `tok_insufficient_funds` declines
//!   (`insufficient_funds`), any other token declines (`invalid_card`);
//! - `tok_slow` approves after about 1 s; `tok_timeout` never answers (nothing is recorded);
//! - `tok_flaky` answers 503 to the first two attempts of an idempotency key, then approves.

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

#[derive(Default)]
struct Ledger {
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
    /// The sandbox's routes.
    pub fn router(self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/v1/authorizations", post(authorize))
            .route("/v1/authorizations/{id}/{operation}", post(operate))
            .route("/v1/ledger", get(ledger))
            .route("/v1/authorizations", get(authorizations))
            .with_state(self)
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

async fn authorize(
    State(sandbox): State<Sandbox>,
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
        "tok_slow" => tokio::time::sleep(std::time::Duration::from_millis(1000)).await,
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
    let fingerprint = serde_json::to_string(&body).unwrap_or_default();
    sandbox.idempotent("authorize", key, fingerprint, move |ledger| {
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
    })
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
    let fingerprint = format!("{id}|{:?}", body.amount);
    sandbox.idempotent(kind, key, fingerprint, move |ledger| {
        let Some(auth) = ledger.authorizations.get(&id).cloned() else {
            return (StatusCode::NOT_FOUND, json!({"error": {"code": "not_found", "message": "no such authorization"}}));
        };
        if kind == "capture" && auth.expires_at <= Utc::now() {
            return (
                StatusCode::CONFLICT,
                json!({"error": {"code": "authorization_expired", "message": "the authorization has expired"}}),
            );
        }
        if auth.status != from {
            return (
                StatusCode::CONFLICT,
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
        });
        (StatusCode::OK, json!({"id": entry_id, "authorizationId": id, "status": to, "amount": amount.to_string()}))
    })
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
    let found: Vec<Value> = ledger
        .entries
        .iter()
        .filter(|e| e.kind == "authorization")
        .filter(|e| query.reference.as_deref().is_none_or(|r| r == e.reference))
        .map(|e| {
            let status = ledger
                .authorizations
                .get(&e.id)
                .map_or(e.status.as_str(), |a| a.status);
            json!({"id": e.id, "status": status, "amount": e.amount, "currency": e.currency})
        })
        .collect();
    Json(json!({ "authorizations": found })).into_response()
}
