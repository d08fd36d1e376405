//! Extractors that turn every malformed input into an `ApiError` instead of axum's
//! plain-text rejections: JSON bodies, path segments and the bearer token.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::AppState;
use crate::auth::Principal;

/// A JSON body whose rejections are API errors (413 for oversize, 422 for wrong shapes).
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

fn json_rejection(rejection: &JsonRejection) -> ApiError {
    let status = rejection.status();
    let text = rejection.body_text();
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::client(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send Content-Type: application/json",
        ),
        JsonRejection::JsonSyntaxError(_) => {
            ApiError::client(StatusCode::BAD_REQUEST, "invalid_json", text)
        }
        JsonRejection::JsonDataError(_) => ApiError::unprocessable("invalid_body", text),
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => ApiError::client(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is too large",
        ),
        _ => ApiError::client(StatusCode::BAD_REQUEST, "invalid_body", text),
    }
}

/// The authenticated caller.
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token>"))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::unauthorized("Authorization must be 'Bearer <token>'"))?;
        let caller = state.verifier.verify(token);
        if let Ok(principal) = &caller {
            state.limits.request(&principal.user_id)?;
        }
        caller
            .map(Caller)
            .map_err(|e| ApiError::unauthorized(e.to_string()))
    }
}

/// An authenticated admin.
pub struct Admin(pub Principal);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Caller(principal) = Caller::from_request_parts(parts, state).await?;
        if !principal.admin {
            return Err(ApiError::client(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this needs the admin role",
            ));
        }
        Ok(Self(principal))
    }
}

/// A SKU from a path: `422 invalid_sku` if it is not one.
pub fn parse_sku(raw: &str) -> Result<crate::domain::Sku, ApiError> {
    crate::domain::Sku::parse(raw)
        .map_err(|e| ApiError::unprocessable("invalid_sku", e.to_string()))
}

/// A destination from a body: the address validated (a known country) and the shipping
/// method, `standard` unless given; `422` with what is wrong otherwise. Quote and checkout
/// share it.
pub fn parse_destination(
    address: crate::domain::Address,
    method: Option<String>,
) -> Result<(crate::domain::Address, String), ApiError> {
    let address = address
        .validated()
        .map_err(|e| ApiError::unprocessable("invalid_address", e.to_string()))?;
    if !crate::pricing::countries::is_known(&address.country) {
        return Err(ApiError::unprocessable(
            "invalid_address",
            "address.country is not an ISO 3166-1 alpha-2 code",
        ));
    }
    let method = method.unwrap_or_else(|| "standard".into());
    if method != "standard" && method != "express" {
        return Err(ApiError::unprocessable(
            "invalid_shipping_method",
            "shippingMethod must be standard or express",
        ));
    }
    Ok((address, method))
}

/// The request's `Idempotency-Key` (required; 1 to 255 visible ASCII characters).
pub fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<String, ApiError> {
    let value = headers.get("Idempotency-Key").ok_or_else(|| {
        ApiError::client(
            StatusCode::BAD_REQUEST,
            "idempotency_key_required",
            "send an Idempotency-Key header (1 to 255 characters)",
        )
    })?;
    value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .map(str::to_owned)
        .ok_or_else(|| {
            ApiError::client(
                StatusCode::BAD_REQUEST,
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            )
        })
}
