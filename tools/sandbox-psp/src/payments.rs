//! Authorizations and the operations on them (capture, void, refund).

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, TimeDelta, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::{
    detached, error, key_of, poisoned, set_entry_status, traceparent_of, Authorization, Ledger,
    LedgerEntry, Sandbox, DEFAULT_AUTHORIZATION_LIFETIME,
};

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
    let expires_at = expiry(now, ledger.authorization_lifetime);
    let recorded = status != "declined";
    if recorded {
        ledger.authorizations.insert(
            id.clone(),
            Authorization {
                amount,
                captured: Decimal::ZERO,
                refunded: Decimal::ZERO,
                voided: Decimal::ZERO,
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

/// When an authorization made at `now` expires (the lifetime saturates at the last instant a
/// date can hold).
fn expiry(now: DateTime<Utc>, lifetime: Option<std::time::Duration>) -> DateTime<Utc> {
    TimeDelta::from_std(lifetime.unwrap_or(DEFAULT_AUTHORIZATION_LIFETIME))
        .ok()
        .and_then(|lifetime| now.checked_add_signed(lifetime))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The issuer's asynchronous answer to a `tok_async` authorization (unless it was voided).
async fn approve_later(sandbox: Sandbox, id: String) {
    tokio::time::sleep(ASYNC_DECISION_DELAY).await;
    if let Err(crate::Undecidable::Decided(status)) = sandbox.decide(&id, "pending", true) {
        tracing::info!(authorization = id, status, "no decision: no longer pending");
    }
}

/// A capture, void or refund.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Capture,
    Void,
    Refund,
}

impl Kind {
    fn parse(operation: &str) -> Option<Self> {
        match operation {
            "capture" => Some(Self::Capture),
            "void" => Some(Self::Void),
            "refund" => Some(Self::Refund),
            _ => None,
        }
    }

    /// Its name: the operation of its faults and idempotency keys, the kind of its entries.
    fn name(self) -> &'static str {
        match self {
            Self::Capture => "capture",
            Self::Void => "void",
            Self::Refund => "refund",
        }
    }

    /// The status of its ledger entries: what it did.
    fn done(self) -> &'static str {
        match self {
            Self::Capture => "captured",
            Self::Void => "voided",
            Self::Refund => "refunded",
        }
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
    let Some(kind) = Kind::parse(&operation) else {
        return error(StatusCode::NOT_FOUND, "not_found", "unknown operation");
    };
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let requested = match requested_amount(kind, body.amount.as_deref()) {
        Ok(requested) => requested,
        Err(why) => return error(StatusCode::BAD_REQUEST, "invalid_amount", why),
    };
    let fault = sandbox.fault_for(kind.name());
    if let Some(f) = fault.as_ref().filter(|f| !f.after_effect) {
        return error(f.status, "injected_fault", "sandbox fault");
    }
    // The same amount written otherwise ("12.5", "12.50") is the same request.
    let fingerprint = format!("{id}|{:?}", requested.as_ref().map(Decimal::normalize));
    let response = sandbox.idempotent(kind.name(), key, fingerprint, move |ledger| {
        record_operation(ledger, &id, kind, requested)
    });
    if let Some(delay) = fault.as_ref().and_then(|f| f.delay) {
        tokio::time::sleep(delay).await;
    }
    match fault {
        Some(f) => error(
            f.status,
            "injected_fault",
            "sandbox fault (after the effect)",
        ),
        None => response,
    }
}

/// The amount a capture or refund asks for (`None`: all that is left), checked before the
/// ledger sees it; a void takes none. Refused: why (an `invalid_amount`).
fn requested_amount(kind: Kind, text: Option<&str>) -> Result<Option<Decimal>, &'static str> {
    let Some(text) = text else {
        return Ok(None);
    };
    if kind == Kind::Void {
        return Err("a void releases all that is left uncaptured; it takes no amount");
    }
    match text.parse::<Decimal>() {
        Ok(amount) if amount > Decimal::ZERO => Ok(Some(amount)),
        Ok(_) => Err("amount must be more than zero"),
        Err(_) => Err("amount must be a decimal string"),
    }
}

/// A reply the ledger logic refuses with (remembered for the idempotency key like any other).
type Refusal = (StatusCode, Value);

fn refusal(status: StatusCode, code: &str, message: impl Into<String>) -> Refusal {
    (
        status,
        json!({"error": {"code": code, "message": message.into()}}),
    )
}

fn invalid_state(auth: &Authorization) -> Refusal {
    refusal(
        StatusCode::BAD_REQUEST,
        "invalid_state",
        format!("authorization is {}", auth.status),
    )
}

/// Carries out an operation on the authorization `id` (once per idempotency key, under the
/// ledger's lock: two refunds at once cannot both take the same money).
fn record_operation(
    ledger: &mut Ledger,
    id: &str,
    kind: Kind,
    requested: Option<Decimal>,
) -> (StatusCode, Value) {
    let Some(auth) = ledger.authorizations.get_mut(id) else {
        return refusal(StatusCode::NOT_FOUND, "not_found", "no such authorization");
    };
    let undecided = matches!(auth.status, "requires_action" | "pending");
    let applied = match kind {
        Kind::Capture => capture(auth, requested),
        Kind::Refund => refund(auth, requested),
        Kind::Void => void(auth),
    };
    let amount = match applied {
        Ok(amount) => amount.to_string(),
        Err(refused) => return refused,
    };
    let status = auth.status;
    let (reference, currency) = (auth.reference.clone(), auth.currency.clone());
    // An authorization voided before it was decided ends there: its entry says so.
    if undecided {
        set_entry_status(&mut ledger.entries, id, status);
    }
    let entry_id = format!("{}_{}", kind.name(), Uuid::new_v4().simple());
    ledger.entries.push(LedgerEntry {
        kind: kind.name(),
        id: entry_id.clone(),
        authorization_id: id.to_owned(),
        reference,
        amount: amount.clone(),
        currency,
        status: kind.done().to_owned(),
        at: Utc::now(),
        traceparent: None,
    });
    (
        StatusCode::OK,
        json!({"id": entry_id, "authorizationId": id, "status": status, "amount": amount}),
    )
}

/// Captures `requested` (all that is left when `None`) of a live `authorized` or `captured`
/// authorization; never more than is left.
fn capture(auth: &mut Authorization, requested: Option<Decimal>) -> Result<Decimal, Refusal> {
    if auth.expires_at <= Utc::now() {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            "authorization_expired",
            "the authorization has expired",
        ));
    }
    if !matches!(auth.status, "authorized" | "captured") {
        return Err(invalid_state(auth));
    }
    let left = auth.uncaptured().max(Decimal::ZERO);
    let amount = requested.unwrap_or(left);
    if left.is_zero() || amount > left {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            "amount_exceeds_authorized",
            format!("{left} of {} is left to capture", auth.amount),
        ));
    }
    auth.captured += amount;
    auth.status = "captured";
    Ok(amount)
}

/// Refunds `requested` (all that is left when `None`) of what was captured; the authorization
/// is `refunded` once all of it is and nothing is left to capture.
fn refund(auth: &mut Authorization, requested: Option<Decimal>) -> Result<Decimal, Refusal> {
    if auth.status != "captured" {
        return Err(invalid_state(auth));
    }
    let left = auth.captured - auth.refunded;
    let amount = requested.unwrap_or(left);
    if amount > left {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            "amount_exceeds_captured",
            format!("{left} of {} captured is left to refund", auth.captured),
        ));
    }
    auth.refunded += amount;
    // Refunded is final, so only once nothing is left to capture either: a shop may refund
    // its first parcel before it ships the second.
    if auth.refunded == auth.captured && auth.uncaptured() <= Decimal::ZERO {
        auth.status = "refunded";
    }
    Ok(amount)
}

/// Releases what is left uncaptured: all of it before a capture (the authorization is then
/// `voided`), the remainder after one (it stays `captured`).
fn void(auth: &mut Authorization) -> Result<Decimal, Refusal> {
    let released = auth.uncaptured();
    match auth.status {
        "authorized" | "requires_action" | "pending" => auth.status = "voided",
        "captured" if released > Decimal::ZERO => {}
        "captured" => {
            return Err(refusal(
                StatusCode::BAD_REQUEST,
                "invalid_state",
                "authorization is captured and nothing is left uncaptured",
            ))
        }
        _ => return Err(invalid_state(auth)),
    }
    auth.voided += released;
    Ok(released)
}

/// `POST /v1/sandbox/authorizations/{id}/expire`: the authorization expires now (unless it
/// already had), so tests need not wait out its lifetime.
pub(crate) async fn expire(State(sandbox): State<Sandbox>, Path(id): Path<String>) -> Response {
    let Ok(mut ledger) = sandbox.ledger.lock() else {
        return poisoned();
    };
    let Some(auth) = ledger.authorizations.get_mut(&id) else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such authorization");
    };
    auth.expires_at = auth.expires_at.min(Utc::now());
    let expires_at = auth.expires_at;
    tracing::info!(authorization = id, %expires_at, "authorization expired by the operator");
    Json(json!({"id": id, "expiresAt": expires_at})).into_response()
}
