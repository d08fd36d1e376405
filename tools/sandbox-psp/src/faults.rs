//! Faults and outages for tests and drills.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use crate::{error, poisoned, Sandbox};

/// An injected fault: matching calls answer `status`.
#[derive(Clone, Debug)]
pub(crate) struct Fault {
    pub(crate) status: StatusCode,
    until: Option<std::time::Instant>,
    remaining: Option<u32>,
    operations: Vec<String>,
    pub(crate) after_effect: bool,
    /// How long an after-effect answer waits: the call is carried out, then nothing is said
    /// for this long (a window to kill the caller between the provider's effect and its
    /// record of it).
    pub(crate) delay: Option<std::time::Duration>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FaultBody {
    status: u16,
    #[serde(default)]
    for_ms: Option<u64>,
    #[serde(default)]
    count: Option<u32>,
    #[serde(default)]
    operations: Vec<String>,
    #[serde(default)]
    after_effect: bool,
    #[serde(default)]
    delay_ms: Option<u64>,
}

#[derive(Deserialize)]
pub(crate) struct OutageBody {
    seconds: u64,
}

impl Sandbox {
    /// The fault that applies to this call now, if any (and counts it).
    pub(crate) fn fault_for(&self, operation: &str) -> Option<Fault> {
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

    /// Whether an outage is under way (and forgets one that is over).
    fn in_outage(&self) -> bool {
        let Ok(mut ledger) = self.ledger.lock() else {
            return false;
        };
        match ledger.outage_until {
            Some(until) if std::time::Instant::now() < until => true,
            Some(_) => {
                ledger.outage_until = None;
                false
            }
            None => false,
        }
    }
}

pub(crate) async fn set_fault(
    State(sandbox): State<Sandbox>,
    Json(body): Json<FaultBody>,
) -> Response {
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
        delay: body.delay_ms.map(std::time::Duration::from_millis),
    };
    match sandbox.ledger.lock() {
        Ok(mut ledger) => {
            ledger.fault = Some(fault);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(_) => poisoned(),
    }
}

pub(crate) async fn clear_fault(State(sandbox): State<Sandbox>) -> Response {
    match sandbox.ledger.lock() {
        Ok(mut ledger) => {
            ledger.fault = None;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(_) => poisoned(),
    }
}

/// `POST /v1/sandbox/outage`: every `/v1/authorizations…` call answers 503 for a while.
pub(crate) async fn set_outage(
    State(sandbox): State<Sandbox>,
    Json(body): Json<OutageBody>,
) -> Response {
    let Some(until) =
        std::time::Instant::now().checked_add(std::time::Duration::from_secs(body.seconds))
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "seconds is too large",
        );
    };
    match sandbox.ledger.lock() {
        Ok(mut ledger) => {
            ledger.outage_until = Some(until);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(_) => poisoned(),
    }
}

pub(crate) async fn clear_outage(State(sandbox): State<Sandbox>) -> Response {
    match sandbox.ledger.lock() {
        Ok(mut ledger) => {
            ledger.outage_until = None;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(_) => poisoned(),
    }
}

/// During an outage the authorization API answers 503 before doing anything; the operator
/// routes, the challenge pages and `/healthz` stay up.
pub(crate) async fn outage(
    State(sandbox): State<Sandbox>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let guarded = path == "/v1/authorizations" || path.starts_with("/v1/authorizations/");
    if guarded && sandbox.in_outage() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the provider is unavailable (sandbox outage)",
        );
    }
    next.run(request).await
}
