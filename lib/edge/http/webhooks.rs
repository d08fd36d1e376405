//! `POST /api/webhooks/psp/{provider}`: the payment provider's webhooks. Verified over the raw
//! body before anything is parsed, checked against the order's amount, stored (deduplicated by
//! the provider's event id) in the transaction that stages its saga message, and only then
//! acknowledged: a 2xx means we have it for good. Refusals change nothing and say why.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::AppState;
use crate::edge::checkout;
use crate::edge::outbox::Outbox;
use crate::payments::webhooks::{self, Refused, SIGNATURE_HEADER};
use crate::saga::events::Event;
use crate::saga::outgoing::Outgoing;
use crate::saga::trace::TraceParent;

/// What a stored delivery answers.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookReceived {
    /// Always true: the event is stored.
    received: bool,
    /// The provider sent this event id before; nothing was done again.
    duplicate: bool,
}

/// Takes in one provider event.
#[utoipa::path(post, path = "/api/webhooks/psp/{provider}", tag = "webhooks",
    params(
        ("provider" = String, Path, description = "the provider's name (`sandbox`)"),
        ("Psp-Signature" = String, Header, description = "t=<unix seconds>,v1=<hex HMAC-SHA256 of \"t.body\">"),
    ),
    request_body(content = String, content_type = "application/json", description = "the provider's event, as it signed it"),
    responses((status = 200, description = "stored; the saga applies it", body = WebhookReceived)))]
pub async fn provider_webhook(
    State(state): State<AppState>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<WebhookReceived>, ApiError> {
    let psp = &state.psp;
    let Some(verifier) = state.webhooks.of(&provider) else {
        return Err(ApiError::not_found(
            "unknown_provider",
            format!("no payment provider is named {provider:?}"),
        ));
    };
    let signature = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
    let received = verifier
        .verify(signature, &body, chrono::Utc::now())
        .and_then(|()| webhooks::parse(&provider, &body))
        .map_err(|refused| refuse(&provider, &refused))?;
    let order = checkout::find_by_order(&state.pool, received.order_id).await?;
    let mut update = received.update;
    // As the payment records it: the fallback's ids carry its name.
    update.auth_id = crate::payments::providers::recorded_id(psp, &provider, &update.auth_id)
        .unwrap_or(update.auth_id);
    if let Some(order) = &order {
        if order.total != update.amount || order.currency.code() != update.currency {
            crate::metrics::provider_webhook(&provider, "amount_mismatch");
            return Err(ApiError::unprocessable(
                "amount_mismatch",
                format!(
                    "the event is for {} {}; the order is {} {}",
                    update.amount,
                    update.currency,
                    order.total,
                    order.currency.code()
                ),
            ));
        }
    }
    let mut tx = state.pool.begin().await?;
    let stored = sqlx::query(
        "INSERT INTO payments.provider_events
             (provider, event_id, order_id, event_type, auth_id, amount, currency, decline_code)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
    )
    .bind(&update.provider)
    .bind(&update.event_id)
    .bind(received.order_id)
    .bind(&update.event_type)
    .bind(&update.auth_id)
    .bind(update.amount)
    .bind(&update.currency)
    .bind(&update.decline_code)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    // An event for an order we never accepted is kept (never acknowledged and dropped), but
    // there is no saga to hand it to.
    let out = match (stored, order) {
        (true, Some(order)) => {
            let event = Event::ProviderUpdate {
                checkout: order.spent().for_the_bus(),
                update,
            };
            let out = Outgoing::new(&event, Some(&TraceParent::new_root()))
                .map_err(|e| ApiError::Internal(e.into()))?;
            Outbox::stage(&mut tx, &out).await?;
            Some(out)
        }
        _ => None,
    };
    tx.commit().await?;
    if let Some(out) = out {
        state.outbox.publish_soon(out);
    }
    crate::metrics::provider_webhook(&provider, if stored { "accepted" } else { "duplicate" });
    Ok(Json(WebhookReceived {
        received: true,
        duplicate: !stored,
    }))
}

fn refuse(provider: &str, refused: &Refused) -> ApiError {
    crate::metrics::provider_webhook(provider, refused.code());
    tracing::warn!(%provider, reason = %refused, "provider webhook refused");
    let status = if refused.is_authentication() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::BAD_REQUEST
    };
    ApiError::client(status, refused.code(), refused.to_string())
}
