//! `POST /api/checkout`: validate, record, publish, answer 202.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use uuid::Uuid;

use super::error::ApiError;
use super::extract::{ApiJson, Caller};
use super::AppState;
use crate::domain::{is_clean_text, Address};
use crate::edge::checkout::CheckoutRequest;
use crate::saga::subjects::HEADER_TRACEPARENT;
use crate::saga::trace::TraceParent;
use tracing::Instrument;

/// The request body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckoutBody {
    cart_id: String,
    payment_method: PaymentMethod,
    address: Address,
    #[serde(default)]
    shipping_method: Option<String>,
}

/// How the buyer pays: a PSP token, never card data.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentMethod {
    token: String,
    /// Where the provider sends the buyer back after a payment challenge (3-D Secure): an
    /// http(s) URL of at most 2,048 characters.
    #[serde(default)]
    return_url: Option<String>,
}

/// A checkout accepted for processing.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    order_id: uuid::Uuid,
    /// Always `pending`: follow `GET /api/orders/{orderId}` or its `/events`.
    status: String,
}

/// Checks the cart out: prices it, records the request under the Idempotency-Key and starts
/// the saga. The same key and body return the same order.
#[utoipa::path(post, path = "/api/checkout", tag = "checkout", security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, description = "1 to 255 characters; the same key and body return the same order")),
    request_body = CheckoutBody,
    responses((status = 202, description = "accepted; the order is pending", body = Accepted,
        headers(("Location" = String, description = "the order")))))]
pub async fn checkout(
    State(state): State<AppState>,
    Caller(caller): Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CheckoutBody>,
) -> Result<impl IntoResponse, ApiError> {
    state.limits.checkout(&caller.user_id)?;
    let key = super::extract::idempotency_key(&headers)?;
    // A cart id that is not a UUID names no cart of this user.
    let cart_id = Uuid::parse_str(&body.cart_id)
        .map_err(|_| ApiError::not_found("cart_not_found", "no such cart"))?;
    let token = body.payment_method.token.trim().to_owned();
    if token.is_empty() || token.len() > 255 || !is_clean_text(&token) {
        return Err(ApiError::unprocessable(
            "invalid_payment_method",
            "paymentMethod.token must be 1 to 255 characters",
        ));
    }
    let return_url = return_url(body.payment_method.return_url)?;
    let (address, shipping_method) =
        super::extract::parse_destination(body.address, body.shipping_method)?;
    // The checkout's trace: the client's, if it sent one, continued by this span.
    let incoming = headers
        .get(HEADER_TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    let span = tracing::info_span!("checkout", user = %caller.user_id);
    if let Some(parent) = &incoming {
        parent.adopt(&span);
    }
    let fallback = incoming.unwrap_or_else(TraceParent::new_root);
    let trace = TraceParent::of_span(&span, &fallback);
    let request = CheckoutRequest {
        cart_id,
        payment_token: token,
        address,
        shipping_method,
        return_url,
    };
    let order_id = state
        .checkouts
        .submit(&caller.user_id, &key, &request, &trace)
        .instrument(span)
        .await?;
    tracing::info!(%order_id, trace_id = %trace.trace_id, "checkout accepted");
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/api/orders/{order_id}"))],
        Json(Accepted {
            order_id,
            status: "pending".into(),
        }),
    ))
}

/// A return URL the provider may send the buyer to: http(s), absolute, at most 2,048 characters.
fn return_url(raw: Option<String>) -> Result<Option<String>, ApiError> {
    let Some(raw) = raw.map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()) else {
        return Ok(None);
    };
    let valid = raw.len() <= 2048
        && reqwest::Url::parse(&raw)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
    if valid {
        Ok(Some(raw))
    } else {
        Err(ApiError::unprocessable(
            "invalid_return_url",
            "paymentMethod.returnUrl must be an absolute http(s) URL of at most 2048 characters",
        ))
    }
}
