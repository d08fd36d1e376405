//! What the provider's dashboard would show: the ledger and the authorizations.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{poisoned, Authorization, LedgerEntry, Sandbox};

#[derive(Deserialize)]
pub(crate) struct LedgerQuery {
    reference: Option<String>,
}

pub(crate) async fn ledger(
    State(sandbox): State<Sandbox>,
    Query(query): Query<LedgerQuery>,
) -> Response {
    let Ok(ledger) = sandbox.ledger.lock() else {
        return poisoned();
    };
    let entries: Vec<&LedgerEntry> = ledger
        .entries
        .iter()
        .filter(|e| query.reference.as_deref().is_none_or(|r| r == e.reference))
        .collect();
    Json(json!({ "entries": entries })).into_response()
}

/// Authorizations of one reference with their current status and what they moved: the sums
/// captured, refunded and voided (for reconciliation).
pub(crate) async fn authorizations(
    State(sandbox): State<Sandbox>,
    Query(query): Query<LedgerQuery>,
) -> Response {
    let Ok(ledger) = sandbox.ledger.lock() else {
        return poisoned();
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
            // A declined authorization (never recorded) moved no money.
            let sum = |of: fn(&Authorization) -> Decimal| auth.map_or(Decimal::ZERO, of);
            json!({"id": e.id, "status": status, "amount": e.amount, "currency": e.currency,
                   "reference": e.reference, "expiresAt": auth.map(|a| a.expires_at),
                   "captures": count("capture"), "refunds": count("refund"),
                   "captured": sum(|a| a.captured).to_string(),
                   "refunded": sum(|a| a.refunded).to_string(),
                   "voided": sum(|a| a.voided).to_string()})
        })
        .collect();
    Json(json!({ "authorizations": found })).into_response()
}
