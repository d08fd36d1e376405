//! The sandbox payment service provider: a small Stripe-like HTTP server used in development
//! and tests. It keeps its ledger in memory (it stands in for someone else's system).
//!
//! Card tokens (`POST /v1/authorizations` with `amount`, `currency`, `token`, `reference` and
//! an optional `returnUrl`):
//! - `tok_visa` approves (risk score 10); `tok_fraud` approves with risk score 92;
//! - `tok_declined` declines (`card_declined`), `tok_insufficient_funds` declines
//!   (`insufficient_funds`), any other token declines (`invalid_card`);
//! - `tok_slow` approves after about 1 s; `tok_timeout` never answers (nothing is recorded);
//! - `tok_flaky` answers 503 to the first two attempts of an idempotency key, then approves;
//! - `tok_3ds` answers `requires_action` with
//!   `"nextAction": {"type": "redirect_to_url", "url": "http://<Host>/challenge/<id>"}`: the
//!   customer's answer on that page decides it (see below);
//! - `tok_async` answers `pending`; about 1 s later it becomes `authorized` and an
//!   `authorization.succeeded` webhook is sent.
//!
//! An authorization's `expiresAt` is its lifetime after it was made: 7 days by default, as card
//! networks allow (`sandbox-psp --authorization-lifetime-secs`, env
//! `SANDBOX_PSP_AUTHORIZATION_LIFETIME_SECS`, or [`Sandbox::with_authorization_lifetime`], for
//! the authorizations made afterwards). Declined ones have none (`null`).
//!
//! After an authorization, what card networks allow (`POST /v1/authorizations/{id}/capture`,
//! `…/refund`, `…/void`; each needs an `Idempotency-Key`; capture and refund take an optional
//! `{"amount": "12.50"}`, a decimal string). An authorization keeps the sums `captured`,
//! `refunded` and `voided`; what is left to capture is `amount − captured − voided`:
//! - capture, while it is `authorized` or `captured` and not expired: `amount` (all that is
//!   left when absent) is captured and it is `captured` (after the first capture, whether
//!   partial or full). Several partial captures are allowed until nothing is left. Past
//!   `expiresAt`: 400 `authorization_expired`; another status: 400 `invalid_state`; more than
//!   is left (or nothing left): 400 `amount_exceeds_authorized`.
//! - refund, while it is `captured`: `amount` (all that was captured and not refunded when
//!   absent) is refunded; it becomes `refunded` only once all it captured is refunded and
//!   nothing is left to capture, and stays `captured` until then. More than is left to refund: 400 `amount_exceeds_captured`;
//!   another status (a `refunded` one included: nothing is left): 400 `invalid_state`.
//! - void, which takes no amount: an `authorized`, `requires_action` or `pending` one becomes
//!   `voided` (`voided` = its amount; a later challenge answer or `tok_async` decision then
//!   changes nothing). A `captured` one with something left uncaptured has that remainder
//!   released (`voided` += it) and stays `captured`, so later captures answer
//!   `amount_exceeds_authorized`; one with nothing left, or another status (`refunded`
//!   included), answers 400 `invalid_state`.
//!
//! Nothing is ever clamped: an amount that is not a decimal string, or is zero or less, answers
//! 400 `invalid_amount` (so does a void sent an amount), an unknown authorization 404
//! `not_found`. A `requires_action` or `pending` authorization cannot be captured (400
//! `invalid_state`). A success answers `{"id": "<capture_|refund_|void_><32 hex>",
//! "authorizationId", "status": <the authorization's status now>, "amount": <what it moved>}`
//! and adds a ledger entry of that kind, id and amount, whose `status` says what it did
//! (`captured`, `refunded` or `voided`). Each operation is checked and applied under the
//! ledger's lock, so two refunds at once cannot both take the same money.
//!
//! Idempotency: each operation (`authorize`, `capture`, `refund`, `void`) answers once per
//! `Idempotency-Key`; a replay answers the first reply (a refusal from the ledger included),
//! whatever the authorization's status is now, and does nothing again. The same key with other
//! parameters (another authorization, another amount; `12.5` and `12.50` are the same amount)
//! answers 422 `idempotency_key_reused`. `GET /v1/authorizations?reference=` (without it, all)
//! lists `{"authorizations": [{"id", "status", "amount", "currency", "reference",
//! "expiresAt", "captures", "refunds", "captured", "refunded", "voided"}]}` with their status
//! now (`captures`, `refunds`: how many; `captured`, `refunded`, `voided`: the sums, decimal
//! strings, `"0"` for a declined one); the authorization's own entry in `GET /v1/ledger`
//! follows its status until it is decided (authorized, failed or voided). What is left after a
//! void or an expiry is authorized again by a new `POST /v1/authorizations` with the token.
//!
//! The challenge (3-D Secure): `GET /challenge/{id}` is a page with the amount, currency and
//! reference and a form that posts `outcome=approve` or `outcome=deny` back to the same URL.
//! `approve` makes the authorization `authorized` (`authorization.succeeded`), `deny` makes it
//! `failed` with decline code `authentication_failed` (`authorization.failed`); then the answer
//! is `303 See Other` to the authorization's `returnUrl`, or a small page when it had none. A
//! second answer (or one to a voided authorization) changes nothing and gets 409; an unknown id
//! 404, an outcome other than those two 400.
//!
//! Webhooks, Stripe's scheme: each event is posted as compact JSON
//! `{"id": "evt_<32 hex>", "type": "authorization.succeeded" | "authorization.failed",
//! "created": <unix s>, "data": {"authorizationId", "reference", "amount", "currency",
//! "status": "authorized" | "failed", "declineCode": null | "authentication_failed"}}` with the
//! header `Psp-Signature: t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, signed again
//! at each attempt (the body and its id never change). A 2xx ends the delivery; anything else is
//! retried (after 0.5 s, doubling up to 10 s) for up to 12 attempts of 5 s each. Without an
//! endpoint the event is kept, not sent.
//!
//! Operator routes (tests and drills; none of them is subject to faults or outages):
//! - `POST /v1/sandbox/authorizations/{id}/expire` makes the authorization expire now (unless
//!   it already had), so tests need not wait out its lifetime: 200 `{"id", "expiresAt"}`, 404
//!   `not_found` for an unknown (or declined) one.
//! - `POST /v1/sandbox/faults` with
//!   `{"status": 503, "forMs": 180000, "count": 3, "operations": ["authorize"], "afterEffect": true}`
//!   makes matching calls answer `status` (for a while, or for `count` calls, or both; all
//!   operations when none are named). With `afterEffect` the call is carried out first and only
//!   its answer is replaced, like a timeout or a 409 that raced an approval; with
//!   `"delayMs": 3000` as well (capture, void and refund) that answer comes only after the wait,
//!   a window to kill the caller between the effect and its record. `DELETE` clears it.
//! - `POST /v1/sandbox/outage` with `{"seconds": 30}` makes every `/v1/authorizations…` call
//!   answer 503 `{"error": {"code": "unavailable", …}}` for that long, before doing anything;
//!   `DELETE` ends it.
//! - `POST /v1/sandbox/webhook-endpoint` with `{"url": "http://…", "secret": "…"}` sets where
//!   webhooks go (replacing any earlier endpoint; `sandbox-psp --webhook-url --webhook-secret`
//!   sets one at start); `DELETE` removes it.
//! - `GET /v1/sandbox/webhooks` lists every event: `{"events": [{"id", "type", "body",
//!   "attempts", "lastStatus", "delivered"}]}`; `POST /v1/sandbox/webhooks/{id}/resend` sends
//!   one again now (same body, fresh signature) and answers `{"status": <the endpoint's or
//!   null>}`, so tests can deliver duplicates.

mod challenge;
mod faults;
mod payments;
mod reports;
#[cfg(test)]
mod tests;
mod webhooks;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{json, Value};

pub use webhooks::{signature_header, verify_signature, SIGNATURE_HEADER};

use faults::Fault;
use webhooks::{EventData, Webhooks};

#[derive(Default)]
struct Ledger {
    fault: Option<Fault>,
    /// Until when every `/v1/authorizations…` call answers 503.
    outage_until: Option<std::time::Instant>,
    /// `(operation path, Idempotency-Key)` -> (request fingerprint, status, reply).
    replies: HashMap<(String, String), (String, StatusCode, Value)>,
    authorizations: HashMap<String, Authorization>,
    entries: Vec<LedgerEntry>,
    /// Attempts per idempotency key, for `tok_flaky`.
    attempts: HashMap<String, u32>,
    /// How long new authorizations stay capturable; [`DEFAULT_AUTHORIZATION_LIFETIME`] when
    /// `None`.
    authorization_lifetime: Option<std::time::Duration>,
}

#[derive(Clone)]
struct Authorization {
    amount: Decimal,
    /// The sum of its captures.
    captured: Decimal,
    /// The sum of its refunds (never more than `captured`).
    refunded: Decimal,
    /// What a void released: the whole amount before any capture, the uncaptured remainder
    /// after one.
    voided: Decimal,
    status: &'static str,
    expires_at: DateTime<Utc>,
    /// The amount as the request wrote it (webhooks echo it).
    amount_text: String,
    currency: String,
    reference: String,
    /// Where the challenge sends the customer back to.
    return_url: Option<String>,
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

impl Authorization {
    /// What is left to capture: the amount less what was captured and what a void released.
    fn uncaptured(&self) -> Decimal {
        self.amount - self.captured - self.voided
    }
}

/// How long a card authorization stays capturable unless the sandbox is told otherwise
/// ([`Sandbox::with_authorization_lifetime`]): 7 days, as card networks allow.
pub const DEFAULT_AUTHORIZATION_LIFETIME: std::time::Duration =
    std::time::Duration::from_secs(7 * 24 * 60 * 60);

/// Shared state of the sandbox.
#[derive(Clone, Default)]
pub struct Sandbox {
    ledger: Arc<Mutex<Ledger>>,
    webhooks: Webhooks,
}

/// Why an undecided authorization could not be decided.
enum Undecidable {
    NotFound,
    /// It is not in the state the decision expects (decided already, or voided).
    Decided(&'static str),
    Poisoned,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

fn poisoned() -> Response {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "ledger poisoned",
    )
}

fn key_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get("Idempotency-Key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .map(str::to_owned)
}

impl Sandbox {
    /// The sandbox, sending its webhooks to `url` signed with `secret` (an endpoint can also be
    /// set or replaced at runtime, `POST /v1/sandbox/webhook-endpoint`).
    pub fn with_webhook_endpoint(self, url: impl Into<String>, secret: impl Into<String>) -> Self {
        self.webhooks.set_endpoint(url.into(), secret.into());
        self
    }

    /// The sandbox, giving the authorizations it makes from now on `lifetime` before they
    /// expire ([`DEFAULT_AUTHORIZATION_LIFETIME`] otherwise). A lifetime past what a date can
    /// hold makes them expire at the last representable instant.
    pub fn with_authorization_lifetime(self, lifetime: std::time::Duration) -> Self {
        if let Ok(mut ledger) = self.ledger.lock() {
            ledger.authorization_lifetime = Some(lifetime);
        }
        self
    }

    /// Serves the sandbox on `listener` until the task running this is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }

    /// The sandbox's routes.
    pub fn router(self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/v1/authorizations",
                post(payments::authorize).get(reports::authorizations),
            )
            .route(
                "/v1/authorizations/{id}/{operation}",
                post(payments::operate),
            )
            .route("/v1/ledger", get(reports::ledger))
            .route(
                "/v1/sandbox/faults",
                post(faults::set_fault).delete(faults::clear_fault),
            )
            .route(
                "/v1/sandbox/outage",
                post(faults::set_outage).delete(faults::clear_outage),
            )
            .route(
                "/v1/sandbox/webhook-endpoint",
                post(webhooks::set_endpoint).delete(webhooks::clear_endpoint),
            )
            .route(
                "/v1/sandbox/authorizations/{id}/expire",
                post(payments::expire),
            )
            .route("/v1/sandbox/webhooks", get(webhooks::list))
            .route(
                "/v1/sandbox/webhooks/{event_id}/resend",
                post(webhooks::resend),
            )
            .route(
                "/challenge/{auth_id}",
                get(challenge::page).post(challenge::answer),
            )
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                faults::outage,
            ))
            .with_state(self)
            .layer(axum::middleware::from_fn(continue_trace))
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
            return poisoned();
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

    /// A copy of the authorization `id`, if there is one.
    fn authorization(&self, id: &str) -> Result<Option<Authorization>, Undecidable> {
        let ledger = self.ledger.lock().map_err(|_| Undecidable::Poisoned)?;
        Ok(ledger.authorizations.get(id).cloned())
    }

    /// Decides the authorization `id` if it is still `from` (`requires_action` for the
    /// challenge, `pending` for `tok_async`): `authorized` when `approve`, `failed`
    /// (`authentication_failed`) otherwise, and sends the webhook. Answers its `returnUrl`.
    fn decide(&self, id: &str, from: &str, approve: bool) -> Result<Option<String>, Undecidable> {
        let (status, decline_code, kind) = if approve {
            ("authorized", None, "authorization.succeeded")
        } else {
            (
                "failed",
                Some("authentication_failed"),
                "authorization.failed",
            )
        };
        let (data, return_url) = {
            let mut guard = self.ledger.lock().map_err(|_| Undecidable::Poisoned)?;
            let ledger = &mut *guard;
            let auth = ledger
                .authorizations
                .get_mut(id)
                .ok_or(Undecidable::NotFound)?;
            if auth.status != from {
                return Err(Undecidable::Decided(auth.status));
            }
            auth.status = status;
            let data = EventData {
                authorization_id: id.to_owned(),
                reference: auth.reference.clone(),
                amount: auth.amount_text.clone(),
                currency: auth.currency.clone(),
                status,
                decline_code,
            };
            let return_url = auth.return_url.clone();
            set_entry_status(&mut ledger.entries, id, status);
            (data, return_url)
        };
        tracing::info!(authorization = id, status, "authorization decided");
        self.webhooks.emit(kind, &data);
        Ok(return_url)
    }
}

/// The authorization's own ledger entry follows it while it is undecided.
fn set_entry_status(entries: &mut [LedgerEntry], id: &str, status: &str) {
    for entry in entries
        .iter_mut()
        .filter(|e| e.kind == "authorization" && e.id == id)
    {
        status.clone_into(&mut entry.status);
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
