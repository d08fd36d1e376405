//! Order lookup: a pending order's stage, a settled order with its shipments, refunds and
//! money (the actions that move it are in `actions`).

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use uuid::Uuid;

use super::actions::PartJson;
use super::error::ApiError;
use super::extract::Caller;
use super::views::money;
use super::AppState;
use crate::auth::Principal;
use crate::edge::checkout;
use crate::orders::parts::{self, PartRecord};
use crate::payments::PaymentView;
use crate::{inventory, orders, payments};

/// An order line.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ItemJson {
    sku: String,
    qty: i32,
    unit_price: String,
    line_total: String,
}

/// An order.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderJson {
    order_id: Uuid,
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    stage: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// While the stage is `requires_action`: where the buyer completes the payment challenge.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_action: Option<NextActionJson>,
    items: Vec<ItemJson>,
    subtotal: String,
    discount: String,
    tax: String,
    shipping: String,
    total: String,
    currency: String,
    payment: PaymentJson,
    /// Where the order ships (from the accepted checkout; the saga's events never carry it).
    #[serde(skip_serializing_if = "Option::is_none")]
    ship_to: Option<crate::domain::Address>,
    /// Its shipments, oldest first (each captured its share of the total).
    shipments: Vec<PartJson>,
    refunds: Vec<PartJson>,
    /// Its money as the payments ledger tells it (settled orders only).
    #[serde(skip_serializing_if = "Option::is_none")]
    money: Option<MoneyJson>,
}

/// What happened to an order's money.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MoneyJson {
    authorized: String,
    captured: String,
    refunded: String,
    voided: String,
}

/// The shipments, refunds and money of a settled order.
async fn money_story(
    state: &AppState,
    order_id: Uuid,
    currency: &str,
) -> Result<(Vec<PartJson>, Vec<PartJson>, MoneyJson), ApiError> {
    let mut conn = state.pool.acquire().await?;
    let view = |parts: Vec<PartRecord>| {
        parts
            .into_iter()
            .map(|p| PartJson::of(p, currency))
            .collect::<Vec<_>>()
    };
    let shipments = view(parts::shipments(&mut conn, order_id).await?);
    let refunds = view(parts::refunds(&mut conn, order_id).await?);
    drop(conn);
    let m = payments::money_of(&state.pool, order_id).await?;
    let money = MoneyJson {
        authorized: money(m.authorized, currency),
        captured: money(m.captured, currency),
        refunded: money(m.refunded, currency),
        voided: money(m.voided, currency),
    };
    Ok((shipments, refunds, money))
}

/// What the buyer must do for the payment to go on (a 3-D Secure challenge).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NextActionJson {
    /// Always `redirect_to_url`.
    #[serde(rename = "type")]
    kind: &'static str,
    url: String,
}

impl NextActionJson {
    /// The challenge to show while the order's stage is `requires_action`.
    fn of(stage: &str, payment: &PaymentView) -> Option<Self> {
        let url = payment.next_action_url.clone()?;
        (stage == "requires_action").then_some(Self {
            kind: "redirect_to_url",
            url,
        })
    }
}

/// The order's payment.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentJson {
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    decline_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// True when an authorization can no longer be captured.
    expired: bool,
    failed_attempts: i32,
    /// The provider holding the payment (the fallback's name when it was routed there).
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<String>,
}

impl PaymentJson {
    fn new(view: PaymentView, settled: bool) -> Self {
        let expired = view.expired();
        Self {
            // A settled order without a payment row never reached the provider.
            status: match view.status {
                Some(status) => status.to_string(),
                None if settled => "none".into(),
                None => "pending".into(),
            },
            decline_code: view.decline_code,
            expires_at: view.expires_at,
            expired,
            failed_attempts: view.failed_attempts,
            provider: view.provider,
        }
    }
}

fn not_found() -> ApiError {
    ApiError::not_found("order_not_found", "no such order")
}

fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| not_found())
}

fn may_see(caller: &Principal, owner: &str) -> bool {
    caller.admin || caller.user_id == owner
}

/// An order: pending (with its stage) until the saga settles, then its status.
#[utoipa::path(get, path = "/api/orders/{order_id}", tag = "orders", security(("bearer" = [])),
    params(("order_id" = String, Path, description = "the order id checkout returned", format = Uuid)),
    responses((status = 200, description = "the order", body = OrderJson)))]
pub async fn get_order(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(order_id): Path<String>,
) -> Result<Json<OrderJson>, ApiError> {
    let order_id = parse_id(&order_id)?;
    // The order first, its payment after: compensation settles the payment before it records
    // the failed order, so a payment read after the order is never older than the order.
    let settled = orders::get_order(&state.pool, order_id).await?;
    let payment = payments::payment_view(&state.pool, order_id).await?;
    if let Some(order) = settled {
        if !may_see(&caller, &order.user_id) {
            return Err(not_found());
        }
        return Ok(Json(settled_view(&state, order, payment).await?));
    }
    // Not settled yet: the edge's own record of the checkout answers, so the owner never
    // sees a 404 for an id that checkout returned.
    let Some(pending) = checkout::find_by_order(&state.pool, order_id).await? else {
        return Err(not_found());
    };
    if !may_see(&caller, &pending.user_id) {
        return Err(not_found());
    }
    let reserved = inventory::reservation_status(&state.pool, order_id)
        .await?
        .is_some();
    let stage = pending_stage(reserved, &payment);
    let currency = pending.currency.code().to_owned();
    Ok(Json(OrderJson {
        order_id,
        status: "pending".into(),
        stage: Some(stage),
        reason: None,
        next_action: NextActionJson::of(stage, &payment),
        items: pending
            .items
            .iter()
            .map(|l| ItemJson {
                sku: l.sku.to_string(),
                qty: l.qty.get(),
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
        payment: PaymentJson::new(payment, false),
        ship_to: pending.address.clone(),
        shipments: Vec::new(),
        refunds: Vec::new(),
        money: None,
    }))
}

/// A settled order with its shipments, refunds and money.
async fn settled_view(
    state: &AppState,
    order: orders::OrderRecord,
    payment: PaymentView,
) -> Result<OrderJson, ApiError> {
    let order_id = order.order_id;
    let currency = order.currency.clone();
    let ship_to = checkout::find_by_order(&state.pool, order_id)
        .await?
        .and_then(|c| c.address);
    let stage = order.pending_action.map(orders::Action::stage);
    let (shipments, refunds, money_now) = money_story(state, order_id, &currency).await?;
    Ok(OrderJson {
        order_id,
        status: order.status.to_string(),
        stage,
        reason: order.reason,
        next_action: None,
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
        payment: PaymentJson::new(payment, true),
        currency,
        ship_to,
        shipments,
        refunds,
        money: Some(money_now),
    })
}

/// Where a pending order stands, from its hold and its payment.
fn pending_stage(reserved: bool, payment: &PaymentView) -> &'static str {
    match payment.status {
        _ if !reserved => "reserving",
        None if payment.failed_attempts > 0 => "payment_pending",
        Some(payments::PaymentStatus::Pending) if payment.next_action_url.is_some() => {
            "requires_action"
        }
        None | Some(payments::PaymentStatus::Pending) => "authorizing",
        Some(_) => "confirming",
    }
}
