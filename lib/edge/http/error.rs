//! Every API error as one enum: a status, a snake_case code and a message. Server-side
//! failures are logged with their cause and answered without it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::bus::Cause;
use crate::edge::cart::CartError;
use crate::edge::checkout::CheckoutError;
use crate::inventory::StockError;

/// An API error.
#[derive(Debug)]
pub enum ApiError {
    /// A client error with its status and code.
    Client {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
    /// A dependency is down (database, NATS): 503 with `Retry-After`, safe to retry. The
    /// cause is logged, not answered.
    Unavailable(Cause),
    /// More requests in flight than the edge admits: 503 with `Retry-After` (seconds), at once.
    Busy(u64),
    /// One user's requests are over their rate limit: 429 with `Retry-After` (seconds).
    TooManyRequests(u64),
    /// A bug: 500, logged with its cause, details withheld.
    Internal(Cause),
}

impl ApiError {
    /// A 4xx with a code and message.
    pub fn client(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self::Client {
            status,
            code,
            message: message.into(),
        }
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::client(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 404 with a code.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::client(StatusCode::NOT_FOUND, code, message)
    }

    /// 422 with a code.
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::client(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            Self::Client {
                status,
                code,
                message,
            } => (status, code, message),
            Self::Unavailable(cause) => {
                tracing::warn!(%cause, "dependency unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "a dependency is unavailable; retry with the same Idempotency-Key".to_owned(),
                )
            }
            Self::TooManyRequests(after) => {
                let body = Json(json!({"error": {"code": "rate_limited",
                    "message": "too many requests from this user; retry after the Retry-After delay"}}));
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(axum::http::header::RETRY_AFTER, after.to_string())],
                    body,
                )
                    .into_response();
            }
            Self::Busy(after) => {
                let body = Json(json!({"error": {"code": "overloaded",
                    "message": "too many requests in flight; retry after the Retry-After delay"}}));
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(axum::http::header::RETRY_AFTER, after.to_string())],
                    body,
                )
                    .into_response();
            }
            Self::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error".to_owned(),
                )
            }
        };
        let body = Json(json!({"error": {"code": code, "message": message}}));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // Every 503 says when to come back: clients (and our bench) back off, not hammer.
            return (status, [(axum::http::header::RETRY_AFTER, "1")], body).into_response();
        }
        (status, body).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    /// The database being away, restarting or overloaded is a 503 (retry), not a 500
    /// (`db::is_transient`).
    fn from(e: sqlx::Error) -> Self {
        // Data the database refused (out of range, a check or foreign key) came from the
        // request: a 4xx, never a 500. A unique violation is a conflict with what exists.
        let code = e
            .as_database_error()
            .and_then(sqlx::error::DatabaseError::code)
            .map(std::borrow::Cow::into_owned)
            .unwrap_or_default();
        match &e {
            _ if crate::db::is_transient(&e) => Self::Unavailable(e.into()),
            _ if code == "23505" => Self::client(
                StatusCode::CONFLICT,
                "conflict",
                "this conflicts with something that already exists",
            ),
            _ if code.starts_with("22") || code.starts_with("23") => Self::unprocessable(
                "invalid_data",
                "a value is out of range or breaks a rule of the data",
            ),
            _ => Self::Internal(e.into()),
        }
    }
}

/// 409 `out_of_stock`: the SKU is (recently known to be) sold out.
pub fn out_of_stock(message: String) -> ApiError {
    ApiError::client(StatusCode::CONFLICT, "out_of_stock", message)
}

impl From<CartError> for ApiError {
    fn from(e: CartError) -> Self {
        match e {
            CartError::UnknownSku(_) => Self::not_found("unknown_sku", e.to_string()),
            CartError::TooMany { .. } => Self::unprocessable("invalid_quantity", e.to_string()),
            CartError::CurrencyMismatch { .. } => {
                Self::unprocessable("currency_mismatch", e.to_string())
            }
            CartError::TooManyLines { .. } => Self::unprocessable("too_many_lines", e.to_string()),
            CartError::NotInCart(_) => Self::not_found("not_in_cart", e.to_string()),
            CartError::Inactive(_) => Self::unprocessable("product_inactive", e.to_string()),
            CartError::ShippingUnavailable(_) => {
                Self::unprocessable("shipping_unavailable", e.to_string())
            }
            CartError::Promo { code, message } => Self::unprocessable(code, message),
            CartError::Contended => {
                Self::client(StatusCode::CONFLICT, "cart_contended", e.to_string())
            }
            CartError::Database(e) => e.into(),
        }
    }
}

impl From<CheckoutError> for ApiError {
    fn from(e: CheckoutError) -> Self {
        match e {
            CheckoutError::CartNotFound => Self::not_found("cart_not_found", e.to_string()),
            CheckoutError::AlreadyCheckedOut => Self::client(
                StatusCode::CONFLICT,
                "cart_already_checked_out",
                e.to_string(),
            ),
            CheckoutError::EmptyCart => Self::unprocessable("empty_cart", e.to_string()),
            CheckoutError::KeyReused => {
                Self::unprocessable("idempotency_key_reused", e.to_string())
            }
            CheckoutError::OutOfStock(_) => out_of_stock(e.to_string()),
            CheckoutError::Cart(e) => e.into(),
            CheckoutError::Database(e) => e.into(),
            CheckoutError::Encode(e) => Self::Internal(e),
        }
    }
}

impl From<StockError> for ApiError {
    fn from(e: StockError) -> Self {
        match e {
            StockError::BelowReserved { .. } => {
                Self::unprocessable("stock_below_reserved", e.to_string())
            }
            StockError::Database(e) => e.into(),
        }
    }
}
