//! Admin: promotion codes.

use axum::extract::{Path, State};
use axum::Json;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::edge::http::error::ApiError;
use crate::edge::http::extract::{parse_sku, Admin, ApiJson};
use crate::edge::http::AppState;
use crate::pricing::{promo, Promo, PromoKind};

/// `PUT /api/admin/promos/{code}` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = AdminPromoBody)]
pub struct PromoBody {
    kind: String,
    /// Percent (0, 100] or a fixed amount, as a decimal string.
    #[serde(default, with = "rust_decimal::serde::str_option")]
    #[schema(value_type = Option<String>, example = "10")]
    value: Option<Decimal>,
    #[serde(default, with = "rust_decimal::serde::str_option")]
    #[schema(value_type = Option<String>, example = "50.00")]
    min_subtotal: Option<Decimal>,
    #[serde(default)]
    starts_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    ends_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    usage_limit: Option<i32>,
    #[serde(default)]
    per_customer_limit: Option<i32>,
    #[serde(default)]
    skus: Option<Vec<String>>,
}

/// A promotion as saved.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PromoSaved {
    code: String,
    kind: &'static str,
}

/// Creates or replaces a promotion code (its usage count is kept).
#[utoipa::path(put, path = "/api/admin/promos/{code}", tag = "admin", security(("bearer" = [])),
    params(("code" = String, Path, description = "1 to 64 letters, digits, - or _", pattern = r"^[A-Za-z0-9_-]{1,64}$")),
    request_body = PromoBody,
    responses((status = 200, description = "saved", body = PromoSaved)))]
pub async fn put_promo(
    State(state): State<AppState>,
    Admin(_admin): Admin,
    Path(code): Path<String>,
    ApiJson(body): ApiJson<PromoBody>,
) -> Result<Json<PromoSaved>, ApiError> {
    let invalid = |m: &str| ApiError::unprocessable("invalid_promo", m.to_owned());
    let code = code.to_ascii_lowercase();
    if code.is_empty()
        || code.len() > 64
        || !code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid("code must be 1 to 64 letters, digits, '-' or '_'"));
    }
    let kind = PromoKind::parse(&body.kind)
        .ok_or_else(|| invalid("kind must be percent, fixed or free_shipping"))?;
    match (kind, body.value) {
        (PromoKind::Percent, Some(v)) if v > Decimal::ZERO && v <= Decimal::ONE_HUNDRED => {}
        (PromoKind::Percent, _) => {
            return Err(invalid("a percent promo needs a value in (0, 100]"))
        }
        (PromoKind::Fixed, Some(v)) if v > Decimal::ZERO && v.scale() <= 4 => {}
        (PromoKind::Fixed, _) => return Err(invalid("a fixed promo needs a positive value")),
        (PromoKind::FreeShipping, _) => {}
    }
    if body.min_subtotal.is_some_and(|m| m < Decimal::ZERO) {
        return Err(invalid("minSubtotal cannot be negative"));
    }
    if let (Some(s), Some(e)) = (body.starts_at, body.ends_at) {
        if e <= s {
            return Err(invalid("endsAt must be after startsAt"));
        }
    }
    if body.usage_limit.is_some_and(|n| n < 0) || body.per_customer_limit.is_some_and(|n| n < 0) {
        return Err(invalid("limits cannot be negative"));
    }
    let skus = match body.skus {
        None => None,
        Some(skus) => Some(
            skus.iter()
                .map(|s| parse_sku(s).map(|s| s.to_string()))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let promo = Promo {
        code: code.clone(),
        kind,
        value: body.value,
        min_subtotal: body.min_subtotal,
        starts_at: body.starts_at,
        ends_at: body.ends_at,
        usage_limit: body.usage_limit,
        per_customer_limit: body.per_customer_limit,
        skus,
        used: 0,
    };
    if let (Some(limit), Some(existing)) = (
        promo.usage_limit,
        promo::get(&mut *state.pool.acquire().await?, &code).await?,
    ) {
        if limit < existing.used {
            return Err(ApiError::unprocessable(
                "usage_limit_below_used",
                format!(
                    "usageLimit {limit} is below the {} times the code was already used",
                    existing.used
                ),
            ));
        }
    }
    promo::upsert(&state.pool, &promo).await?;
    Ok(Json(PromoSaved {
        code,
        kind: kind.as_str(),
    }))
}
