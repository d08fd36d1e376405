//! Authorizations and the operations on them (capture, void, refund).

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use chrono::{Duration, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::{
    detached, error, key_of, poisoned, set_entry_status, traceparent_of, Authorization, Ledger,
    LedgerEntry, Sandbox,
};

/// How long a card authorization stays capturable.
const AUTHORIZATION_LIFETIME_DAYS: i64 = 7;

/// How long a `tok_async` authorization stays `pending`.
const ASYNC_DECISION_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Deserialize, Serialize)]
pub(crate) struct AuthorizeBody {
    amount: String,
    currency: String,
    token: String,
    reference: String,
    /// Where the challenge page sends the customer back to. Left out of the fingerprint when
    /// absent, so the fingerprints of requests without it are what they were.
    #[serde(default, rename = "returnUrl", skip_serializing_if = "Option::is_none")]
    return_url: Option<String>,
}

#[derive(Deserialize, Serialize, Default)]
pub(crate) struct AmountBody {
    #[serde(default)]
    amount: Option<String>,
}

/// What a token makes of an authorization: status, decline code, risk score.
fn outcome_of(token: &str) -> (&'static str, Option<&'static str>, u8) {
    match token {
        "tok_visa" | "tok_slow" | "tok_flaky" => ("authorized", None, 10),
        "tok_fraud" => ("authorized", None, 92),
        "tok_3ds" => ("requires_action", None, 10),
        "tok_async" => ("pending", None, 10),
        "tok_declined" => ("declined", Some("card_declined"), 10),
        "tok_insufficient_funds" => ("declined", Some("insufficient_funds"), 10),
        _ => ("declined", Some("invalid_card"), 10),
    }
}

pub(crate) async fn authorize(
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
                return poisoned();
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
    let request = Request {
        body,
        amount,
        host: headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("127.0.0.1")
            .to_owned(),
        traceparent: traceparent_of(&headers),
    };
    let recorder = sandbox.clone();
    let response = sandbox.idempotent("authorize", key, fingerprint, move |ledger| {
        record_authorization(&recorder, ledger, request)
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

/// An authorization request, checked.
struct Request {
    body: AuthorizeBody,
    amount: Decimal,
    /// The request's `Host`, for the challenge URL.
    host: String,
    traceparent: Option<String>,
}

/// Carries out an authorization (once per idempotency key) and answers its reply.
fn record_authorization(
    sandbox: &Sandbox,
    ledger: &mut Ledger,
    request: Request,
) -> (StatusCode, Value) {
    let Request {
        body,
        amount,
        host,
        traceparent,
    } = request;
    let id = format!("auth_{}", Uuid::new_v4().simple());
    let now = Utc::now();
    let (status, decline_code, risk_score) = outcome_of(&body.token);
    let expires_at = now + Duration::days(AUTHORIZATION_LIFETIME_DAYS);
    let recorded = status != "declined";
    if recorded {
        ledger.authorizations.insert(
            id.clone(),
            Authorization {
                amount,
                captured: Decimal::ZERO,
                status,
                expires_at,
                amount_text: body.amount.clone(),
                currency: body.currency.clone(),
                reference: body.reference.clone(),
                return_url: body.return_url.clone(),
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
    let mut reply = json!({
        "id": id,
        "status": status,
        "declineCode": decline_code,
        "amount": body.amount,
        "currency": body.currency,
        "reference": body.reference,
        "riskScore": risk_score,
        "expiresAt": recorded.then_some(expires_at),
    });
    match status {
        "requires_action" => {
            if let Some(fields) = reply.as_object_mut() {
                fields.insert(
                    "nextAction".to_owned(),
                    json!({"type": "redirect_to_url", "url": format!("http://{host}/challenge/{id}")}),
                );
            }
        }
        "pending" => {
            tokio::spawn(approve_later(sandbox.clone(), id));
        }
        _ => {}
    }
    (StatusCode::OK, reply)
}

/// The issuer's asynchronous answer to a `tok_async` authorization (unless it was voided).
async fn approve_later(sandbox: Sandbox, id: String) {
    tokio::time::sleep(ASYNC_DECISION_DELAY).await;
    if let Err(crate::Undecidable::Decided(status)) = sandbox.decide(&id, "pending", true) {
        tracing::info!(authorization = id, status, "no decision: no longer pending");
    }
}

pub(crate) async fn operate(
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
    let (kind, from, to): (&'static str, &'static [&'static str], &'static str) =
        match operation.as_str() {
            "capture" => ("capture", &["authorized"], "captured"),
            "void" => (
                "void",
                &["authorized", "requires_action", "pending"],
                "voided",
            ),
            "refund" => ("refund", &["captured"], "refunded"),
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
        let operation = Operation {
            kind,
            from,
            to,
            requested,
        };
        record_operation(ledger, &id, &operation)
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

/// A capture, void or refund: which states it applies to and the state it leads to.
struct Operation {
    kind: &'static str,
    from: &'static [&'static str],
    to: &'static str,
    requested: Option<Decimal>,
}

/// Carries out an operation on the authorization `id` (once per idempotency key).
fn record_operation(ledger: &mut Ledger, id: &str, operation: &Operation) -> (StatusCode, Value) {
    let Operation {
        kind,
        from,
        to,
        requested,
    } = *operation;
    let Some(auth) = ledger.authorizations.get(id).cloned() else {
        return (
            StatusCode::NOT_FOUND,
            json!({"error": {"code": "not_found", "message": "no such authorization"}}),
        );
    };
    if kind == "capture" && auth.expires_at <= Utc::now() {
        return (
            StatusCode::BAD_REQUEST,
            json!({"error": {"code": "authorization_expired", "message": "the authorization has expired"}}),
        );
    }
    if !from.contains(&auth.status) {
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
    if let Some(a) = ledger.authorizations.get_mut(id) {
        a.status = to;
        if kind == "capture" {
            a.captured = amount;
        }
    }
    // An authorization voided before it was decided ends there: its entry says so.
    if matches!(auth.status, "requires_action" | "pending") {
        set_entry_status(&mut ledger.entries, id, to);
    }
    let entry_id = format!("{kind}_{}", Uuid::new_v4().simple());
    ledger.entries.push(LedgerEntry {
        kind,
        id: entry_id.clone(),
        authorization_id: id.to_owned(),
        reference: reference.0,
        amount: amount.to_string(),
        currency: reference.1,
        status: to.to_owned(),
        at: Utc::now(),
        traceparent: None,
    });
    (
        StatusCode::OK,
        json!({"id": entry_id, "authorizationId": id, "status": to, "amount": amount.to_string()}),
    )
}
