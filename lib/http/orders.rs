//! `GET /api/orders/{id}`: the settled order, or the pending checkout with its stage.

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use uuid::Uuid;

use super::error::ApiError;
use super::extract::Caller;
use super::views::money;
use super::AppState;
use crate::{checkout, inventory, orders, payments};

/// An order line.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemJson {
    sku: String,
    qty: i32,
    unit_price: String,
    line_total: String,
}

/// An order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderJson {
    order_id: Uuid,
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    stage: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    items: Vec<ItemJson>,
    subtotal: String,
    discount: String,
    tax: String,
    shipping: String,
    total: String,
    currency: String,
    payment: PaymentJson,
}

/// The order's payment.
#[derive(Serialize)]
pub struct PaymentJson {
    status: String,
}

fn not_found() -> ApiError {
    ApiError::not_found("order_not_found", "no such order")
}

pub async fn get_order(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(order_id): Path<String>,
) -> Result<Json<OrderJson>, ApiError> {
    let order_id = Uuid::parse_str(&order_id).map_err(|_| not_found())?;
    let payment = payments::payment_status(&state.pool, order_id)
        .await?
        .unwrap_or_else(|| "pending".into());
    if let Some(order) = orders::get_order(&state.pool, order_id).await? {
        if order.user_id != caller.user_id && !caller.admin {
            return Err(not_found());
        }
        let currency = order.currency.clone();
        return Ok(Json(OrderJson {
            order_id,
            status: order.status,
            stage: None,
            reason: order.reason,
            items: order
                .items
                .iter()
                .map(|i| ItemJson {
                    sku: i.sku.clone(),
                    qty: i.qty,
                    unit_price: money(i.price, &currency),
                    line_total: money(i.price * rust_decimal::Decimal::from(i.qty), &currency),
                })
                .collect(),
            subtotal: money(order.subtotal, &currency),
            discount: money(order.discount, &currency),
            tax: money(order.tax, &currency),
            shipping: money(order.shipping, &currency),
            total: money(order.total, &currency),
            // A settled order without a payment row never reached the provider.
            payment: PaymentJson {
                status: if payment == "pending" {
                    "none".into()
                } else {
                    payment
                },
            },
            currency,
        }));
    }
    // Not settled yet: the edge's own record of the checkout answers, so the owner never
    // sees a 404 for an id that checkout returned.
    let Some(pending) = checkout::find_by_order(&state.pool, order_id).await? else {
        return Err(not_found());
    };
    if pending.user_id != caller.user_id && !caller.admin {
        return Err(not_found());
    }
    let stage = match inventory::reservation_status(&state.pool, order_id)
        .await?
        .as_deref()
    {
        None => "reserving",
        Some(_) if payment == "pending" => "authorizing",
        Some(_) => "confirming",
    };
    let currency = pending.currency.clone();
    Ok(Json(OrderJson {
        order_id,
        status: "pending".into(),
        stage: Some(stage),
        reason: None,
        items: pending
            .items
            .iter()
            .map(|l| ItemJson {
                sku: l.sku.to_string(),
                qty: l.qty,
                unit_price: money(l.unit_price, &currency),
                line_total: money(l.line_total, &currency),
            })
            .collect(),
        subtotal: money(pending.subtotal, &currency),
        discount: money(pending.discount, &currency),
        tax: money(pending.tax, &currency),
        shipping: money(pending.shipping, &currency),
        total: money(pending.total, &currency),
        currency,
        payment: PaymentJson { status: payment },
    }))
}
