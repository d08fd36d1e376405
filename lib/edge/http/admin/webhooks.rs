//! Admin: the shop's webhook endpoints, their delivery log and replay.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::is_clean_text;
use crate::edge::http::error::ApiError;
use crate::edge::http::extract::{Admin, ApiJson};
use crate::edge::http::AppState;
use crate::webhooks::endpoints::{self, Endpoint, SecretError, EVENT_TYPES};
use crate::webhooks::target;

/// `POST /api/admin/webhooks`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointBody {
    /// Where the messages go: http or https, on a public address.
    url: String,
    /// Which order events: `order.confirmed`, `order.failed`, `order.shipped`,
    /// `order.cancelled`, `order.refunded`.
    events: Vec<String>,
    #[serde(default)]
    description: String,
}

/// An endpoint (its secret only when it is created or rotated).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointJson {
    id: Uuid,
    url: String,
    description: String,
    events: Vec<String>,
    /// `enabled` or `disabled`.
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    disabled_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failing_since: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    /// The signing secret (`whsec_` + base64), shown once.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

impl EndpointJson {
    fn of(e: Endpoint, secret: Option<String>) -> Self {
        Self {
            id: e.endpoint_id,
            url: e.url,
            description: e.description,
            events: e.events,
            status: e.status,
            disabled_reason: e.disabled_reason,
            failing_since: e.failing_since,
            created_at: e.created_at,
            secret,
        }
    }
}

fn not_found() -> ApiError {
    ApiError::not_found("webhook_not_found", "no such webhook endpoint")
}

fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| not_found())
}

fn secret_error(e: SecretError) -> ApiError {
    match e {
        SecretError::Database(e) => e.into(),
        other => ApiError::Internal(other.into()),
    }
}

/// Registers an endpoint; its secret is in the answer, and only there.
#[utoipa::path(post, path = "/api/admin/webhooks", tag = "admin", security(("bearer" = [])),
    request_body = EndpointBody,
    responses((status = 201, description = "registered", body = EndpointJson)))]
pub async fn create_webhook(
    State(state): State<AppState>,
    Admin(_admin): Admin,
    ApiJson(body): ApiJson<EndpointBody>,
) -> Result<impl IntoResponse, ApiError> {
    let url = target::parse(&body.url)
        .map_err(|e| ApiError::unprocessable("invalid_webhook_url", e.to_string()))?;
    target::resolve(&url, state.merchant_webhooks.allow_private_targets)
        .await
        .map_err(|e| ApiError::unprocessable("invalid_webhook_url", e.to_string()))?;
    let mut events = body.events.clone();
    events.sort();
    events.dedup();
    if events.is_empty() || events.iter().any(|e| !EVENT_TYPES.contains(&e.as_str())) {
        return Err(ApiError::unprocessable(
            "invalid_events",
            format!("events: one or more of {}", EVENT_TYPES.join(", ")),
        ));
    }
    if body.description.len() > 500 || !is_clean_text(&body.description) {
        return Err(ApiError::unprocessable(
            "invalid_description",
            "description: at most 500 characters",
        ));
    }
    let (endpoint, secret) = endpoints::create(
        &state.pool,
        &state.seal,
        url.as_str(),
        &events,
        body.description.trim(),
    )
    .await
    .map_err(secret_error)?;
    Ok((
        StatusCode::CREATED,
        Json(EndpointJson::of(endpoint, Some(secret))),
    ))
}

/// Every endpoint.
#[utoipa::path(get, path = "/api/admin/webhooks", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "the endpoints", body = Vec<EndpointJson>)))]
pub async fn list_webhooks(
    State(state): State<AppState>,
    Admin(_admin): Admin,
) -> Result<Json<Vec<EndpointJson>>, ApiError> {
    let all = endpoints::list(&state.pool).await?;
    Ok(Json(
        all.into_iter().map(|e| EndpointJson::of(e, None)).collect(),
    ))
}

/// One endpoint.
#[utoipa::path(get, path = "/api/admin/webhooks/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "the endpoint", format = Uuid)),
    responses((status = 200, description = "the endpoint", body = EndpointJson)))]
pub async fn get_webhook(
    State(state): State<AppState>,
    Admin(_admin): Admin,
    Path(id): Path<String>,
) -> Result<Json<EndpointJson>, ApiError> {
    let endpoint = endpoints::get(&state.pool, parse_id(&id)?)
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(EndpointJson::of(endpoint, None)))
}

/// Deletes an endpoint: nothing more is sent to it.
#[utoipa::path(delete, path = "/api/admin/webhooks/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "the endpoint", format = Uuid)),
    responses((status = 204, description = "deleted")))]
pub async fn delete_webhook(
    State(state): State<AppState>,
    Admin(_admin): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if endpoints::delete(&state.pool, parse_id(&id)?).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found())
    }
}

/// `POST /api/admin/webhooks/{id}/rotate`.
#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    /// How long the old secret keeps signing beside the new one, e.g. `"24h"` (default; at
    /// most 7 days; `"0s"` ends it at once).
    #[serde(default)]
    overlap: Option<String>,
}

/// A rotated secret.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotatedJson {
    secret: String,
    previous_valid_until: DateTime<Utc>,
}

/// Gives an endpoint a new secret; messages carry both signatures during the overlap.
#[utoipa::path(post, path = "/api/admin/webhooks/{id}/rotate", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "the endpoint", format = Uuid)),
    request_body = RotateBody,
    responses((status = 200, description = "the new secret", body = RotatedJson)))]
pub async fn rotate_webhook(
    State(state): State<AppState>,
    Admin(_admin): Admin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RotateBody>,
) -> Result<Json<RotatedJson>, ApiError> {
    let overlap = match body.overlap.as_deref() {
        None => Duration::from_secs(86_400),
        Some(text) => humantime::parse_duration(text)
            .ok()
            .filter(|d| *d <= Duration::from_secs(7 * 86_400))
            .ok_or_else(|| {
                ApiError::unprocessable("invalid_overlap", "overlap: a duration up to 7d, e.g. 24h")
            })?,
    };
    let secret = endpoints::rotate(&state.pool, &state.seal, parse_id(&id)?, overlap)
        .await
        .map_err(secret_error)?
        .ok_or_else(not_found)?;
    let until = Utc::now() + chrono::Duration::from_std(overlap).unwrap_or_default();
    Ok(Json(RotatedJson {
        secret,
        previous_valid_until: until,
    }))
}

/// Turns an endpoint off until it is enabled again (what comes meanwhile is a replay away).
#[utoipa::path(post, path = "/api/admin/webhooks/{id}/disable", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "the endpoint", format = Uuid)),
    responses((status = 200, description = "disabled", body = EndpointJson)))]
pub async fn disable_webhook(
    State(state): State<AppState>,
    Admin(_admin): Admin,
    Path(id): Path<String>,
) -> Result<Json<EndpointJson>, ApiError> {
    let endpoint = endpoints::disable(&state.pool, parse_id(&id)?)
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(EndpointJson::of(endpoint, None)))
}

/// Turns a disabled endpoint back on.
#[utoipa::path(post, path = "/api/admin/webhooks/{id}/enable", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "the endpoint", format = Uuid)),
    responses((status = 200, description = "enabled", body = EndpointJson)))]
pub async fn enable_webhook(
    State(state): State<AppState>,
    Admin(_admin): Admin,
    Path(id): Path<String>,
) -> Result<Json<EndpointJson>, ApiError> {
    let endpoint = endpoints::enable(&state.pool, parse_id(&id)?)
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(EndpointJson::of(endpoint, None)))
}
