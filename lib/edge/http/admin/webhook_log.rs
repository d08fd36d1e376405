//! Admin: an endpoint's delivery log, and replay.

use axum::extract::{Path, RawQuery, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::edge::http::error::ApiError;
use crate::edge::http::extract::{Admin, ApiJson};
use crate::edge::http::AppState;
use crate::webhooks::{endpoints, log};

/// One attempt of a delivery.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptJson {
    attempt: i32,
    at: DateTime<Utc>,
    /// The endpoint's HTTP status (none when no answer came).
    #[serde(skip_serializing_if = "Option::is_none")]
    status_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    latency_ms: i32,
}

/// One message to the endpoint and how its delivery went.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryJson {
    /// The `webhook-id` it carries on every attempt.
    webhook_id: String,
    #[serde(rename = "type")]
    event_type: String,
    order_id: Uuid,
    /// `pending`, `delivered`, or `failed` (given up after the retry period).
    status: String,
    attempts: Vec<AttemptJson>,
    /// While pending: when it is tried next.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_attempt_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivered_at: Option<DateTime<Utc>>,
}

/// An endpoint's latest deliveries.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DeliveriesJson {
    deliveries: Vec<DeliveryJson>,
}

/// `?limit=` (1 to 500, default 100), read by hand: axum's query extractor answers a bad
/// value in plain text, and every answer of ours is JSON.
fn limit_of(query: Option<&str>) -> Result<i64, ApiError> {
    let invalid = || ApiError::unprocessable("invalid_limit", "limit: 1 to 500");
    let mut limit = 100;
    for pair in query.unwrap_or_default().split('&') {
        if let Some(value) = pair.strip_prefix("limit=") {
            limit = value.parse().map_err(|_| invalid())?;
        }
    }
    if (1..=500).contains(&limit) {
        Ok(limit)
    } else {
        Err(invalid())
    }
}

fn not_found() -> ApiError {
    ApiError::not_found("webhook_not_found", "no such webhook endpoint")
}

async fn endpoint(state: &AppState, raw: &str) -> Result<Uuid, ApiError> {
    let id = Uuid::parse_str(raw).map_err(|_| not_found())?;
    endpoints::get(&state.pool, id)
        .await?
        .map(|e| e.endpoint_id)
        .ok_or_else(not_found)
}

/// The endpoint's latest deliveries, newest first, with every attempt.
#[utoipa::path(get, path = "/api/admin/webhooks/{id}/deliveries", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "the endpoint", format = Uuid),
        ("limit" = Option<i64>, Query, description = "1 to 500 (default 100)", minimum = 1, maximum = 500)),
    responses((status = 200, description = "the delivery log", body = DeliveriesJson)))]
pub async fn webhook_deliveries(
    State(state): State<AppState>,
    Admin(_admin): Admin,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<DeliveriesJson>, ApiError> {
    let id = endpoint(&state, &id).await?;
    let limit = limit_of(query.as_deref())?;
    let (deliveries, attempts) = log::deliveries(&state.pool, id, limit).await?;
    let deliveries = deliveries
        .into_iter()
        .map(|d| DeliveryJson {
            attempts: attempts
                .iter()
                .filter(|a| a.webhook_id == d.webhook_id)
                .map(|a| AttemptJson {
                    attempt: a.attempt,
                    at: a.at,
                    status_code: a.status_code,
                    error: a.error.clone(),
                    latency_ms: a.latency_ms,
                })
                .collect(),
            next_attempt_at: (d.status == "pending").then_some(d.next_attempt_at),
            webhook_id: d.webhook_id,
            event_type: d.event_type,
            order_id: d.order_id,
            status: d.status,
            created_at: d.created_at,
            delivered_at: d.delivered_at,
        })
        .collect();
    Ok(Json(DeliveriesJson { deliveries }))
}

/// `POST /api/admin/webhooks/{id}/replay`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    /// Send again every message of its types since this instant (RFC 3339).
    since: DateTime<Utc>,
}

/// How many messages were queued again.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ReplayedJson {
    queued: u64,
}

/// Sends again what the endpoint was sent since `since`, and what it never got while it was
/// disabled (same `webhook-id`s).
#[utoipa::path(post, path = "/api/admin/webhooks/{id}/replay", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "the endpoint", format = Uuid)),
    request_body = ReplayBody,
    responses((status = 200, description = "queued again", body = ReplayedJson)))]
pub async fn replay_webhook(
    State(state): State<AppState>,
    Admin(_admin): Admin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ReplayBody>,
) -> Result<Json<ReplayedJson>, ApiError> {
    let id = endpoint(&state, &id).await?;
    let queued = log::replay(&state.pool, id, body.since).await?;
    Ok(Json(ReplayedJson { queued }))
}

#[cfg(test)]
mod tests {
    use super::limit_of;

    #[test]
    fn a_limit_is_1_to_500_and_anything_else_is_a_json_error() {
        assert_eq!(limit_of(None).ok(), Some(100));
        assert_eq!(limit_of(Some("limit=7")).ok(), Some(7));
        for bad in [
            "limit=0",
            "limit=501",
            "limit=9223372036854775808",
            "limit=x",
        ] {
            assert!(limit_of(Some(bad)).is_err(), "{bad}");
        }
    }
}
